"""Shardings, devices and meshes: the abstract ``Sharding`` of the IR (construction, errors,
geometry, printing, equality as a cache key), ``devices()``, ``Mesh``, ``PartitionSpec`` and
``NamedSharding``. ``tests/conftest.py`` gives this process 8 virtual CPU devices."""

import pickle
import subprocess
import sys

import numpy as np
import pytest

import ember
import ember.numpy as enp
from ember import parallel as P
from ember.ir.params import param_key
from ember.ir.sharding import Sharding, ShardingError
from ember.ir.types import ArrayType
from ember.parallel.mesh import _devices_per_process, _even_factors

F32 = np.dtype(np.float32)


# --- the abstract Sharding --------------------------------------------------------------------

def test_sharding_normalises_entries_and_says_what_it_is():
    s = Sharding({"dp": 4, "tp": 2}, ("dp", None, ("tp",)))
    assert s.mesh == (("dp", 4), ("tp", 2))
    assert s.dims == (("dp",), (), ("tp",))
    assert s.ndim == 3 and s.partial == ()
    assert s.axis_sizes == {"dp": 4, "tp": 2}
    assert [s.split_count(i) for i in range(3)] == [4, 1, 2]
    assert not s.is_replicated
    rep = Sharding.replicated({"dp": 4}, 2)
    assert rep.is_replicated and rep.dims == ((), ())
    assert not Sharding({"tp": 2}, (None,), partial="tp").is_replicated


@pytest.mark.parametrize("mesh, dims, partial, message", [
    ({"dp": 2}, ("tp",), (), "dimension 0 names mesh axis 'tp', which the mesh"),
    ({"dp": 2}, ("dp", "dp"), (), "mesh axis 'dp' is used by both dimension 0 and dimension 1"),
    ({"dp": 2, "tp": 2}, (("dp", "tp"), "tp"), (), "an axis splits at most one dimension"),
    ({"dp": 2}, ("dp",), ("dp",), "used by both dimension 0 and the partial sums"),
    ((("dp", 2), ("dp", 4)), (None,), (), "mesh axis 'dp' appears twice"),
    ({"_": 2}, (None,), (), "reserved"),
    ({"dp": 0}, (None,), (), "has size 0"),
    ({"dp": 2}, (3,), (), "must be None, a name or a tuple of names"),
])
def test_sharding_construction_errors(mesh, dims, partial, message):
    with pytest.raises(ShardingError, match=message) as e:
        Sharding(mesh, dims, partial)
    assert "test_parallel_sharding.py" in str(e.value)  # the user's line


def test_local_shape_and_blocks_follow_the_mixed_radix_rule():
    s = Sharding({"a": 2, "b": 3}, (("a", "b"), None))
    assert s.local_shape((12, 5)) == (2, 5)
    # block index = c[a] * 3 + c[b], major first
    for ca in range(2):
        for cb in range(3):
            block = ca * 3 + cb
            assert s.block_slices((12, 5), {"a": ca, "b": cb}) == \
                (slice(2 * block, 2 * block + 2), slice(0, 5))
    swapped = Sharding({"a": 2, "b": 3}, (("b", "a"), None))
    assert swapped.block_slices((12, 5), {"a": 1, "b": 2})[0] == slice(10, 12)  # 2*2+1 = 5


def test_local_shape_uneven_names_dimension_axis_and_sizes():
    s = Sharding({"dp": 4, "tp": 2}, (None, "dp"))
    with pytest.raises(ShardingError, match=r"dimension 1 of size 10 does not divide evenly "
                                            r"over mesh axis 'dp' \(size 4\)"):
        s.local_shape((3, 10))
    both = Sharding({"dp": 4, "tp": 2}, (("dp", "tp"),))
    with pytest.raises(ShardingError, match=r"'dp' of size 4, 'tp' of size 2 \(8 blocks\)"):
        both.local_shape((12,))
    with pytest.raises(ShardingError, match="cannot lay out a value of shape"):
        s.local_shape((4,))


def test_printed_forms():
    mesh = {"dp": 2, "tp": 2}
    assert str(Sharding(mesh, ("dp", None))) == "{dp,_}"
    assert str(Sharding(mesh, (("dp", "tp"), None))) == "{(dp,tp),_}"
    assert str(Sharding(mesh, (None, None), "tp")) == "{_,_}+tp"
    assert str(Sharding(mesh, (None,), ("dp", "tp"))) == "{_}+(dp,tp)"
    assert str(Sharding(mesh, ())) == "{}"
    t = ArrayType((8, 576), F32, sharding=Sharding(mesh, ("dp", None)))
    assert str(t) == "f32[8,576]{dp,_}"
    assert str(ArrayType((8, 576), F32)) == "f32[8,576]"
    assert "mesh=(dp=2, tp=2)" in repr(Sharding(mesh, ("dp", None)))


def test_equality_hashing_and_pickling_make_it_a_cache_key():
    a = Sharding({"dp": 2, "tp": 2}, ("dp", None))
    b = Sharding((("dp", 2), ("tp", 2)), (("dp",), ()))
    c = Sharding({"dp": 2, "tp": 2}, (None, "dp"))
    d = Sharding({"dp": 4, "tp": 1}, ("dp", None))  # same names, other sizes
    assert a == b and hash(a) == hash(b)
    assert a != c and a != d
    assert pickle.loads(pickle.dumps(a)) == a
    assert param_key(a) == param_key(b) != param_key(c)
    ta, tb = ArrayType((4, 4), F32, sharding=a), ArrayType((4, 4), F32, sharding=b)
    assert ta == tb and hash(ta) == hash(tb)
    assert ta != ArrayType((4, 4), F32, sharding=c) and ta != ArrayType((4, 4), F32)


def test_jit_traces_anew_for_another_sharding():
    mesh = P.Mesh(P.devices()[:4], ("dp", "tp"))
    f = ember.jit(lambda x: x * 2.0)
    x = np.arange(16.0, dtype=np.float32).reshape(4, 4)
    rows = P.device_put(x, P.NamedSharding(mesh, P.PartitionSpec("dp")))
    cols = P.device_put(x, P.NamedSharding(mesh, P.PartitionSpec(None, "dp")))
    rows_text = f.lower(rows).as_text()  # the per-device program: local blocks
    cols_text = f.lower(cols).as_text()
    assert "f32[2,4]{dp,_}" in rows_text and "f32[4,2]{_,dp}" in cols_text
    np.testing.assert_array_equal(np.asarray(f(rows)), x * 2)
    np.testing.assert_array_equal(np.asarray(f(cols)), x * 2)
    assert "{dp,_} -> f32[4,4]{_,dp}" in f.cache_info()["last_retrace_reason"]
    np.testing.assert_array_equal(np.asarray(f(enp.asarray(x))), x * 2)
    np.testing.assert_array_equal(np.asarray(f(rows)), x * 2)
    assert f.trace_count == 3 and f.cache_info()["hits"] == 1


# --- devices ----------------------------------------------------------------------------------

def test_devices_are_the_virtual_cpu_devices_of_this_process():
    ds = P.devices()
    assert P.device_count() == len(ds) == 8
    assert [d.id for d in ds] == list(range(8))
    assert all(d.process_index == 0 and d.platform == "cpu" for d in ds)
    assert P.local_devices() == ds
    assert P.process_index() == 0 and P.process_count() == 1
    assert repr(ds[3]) == "Device(cpu:3, process=0)"


@pytest.mark.parametrize("value, processes, expected", [
    (None, 1, 1), ("", 1, 1), ("4", 1, 4), (" 2 ", 1, 2), ("1", 4, 1), (None, 4, 1)])
def test_devices_per_process(value, processes, expected):
    assert _devices_per_process(value, processes) == expected


@pytest.mark.parametrize("value, processes, message", [
    ("0", 1, "expected a positive whole number"), ("two", 1, "expected a positive"),
    ("-3", 1, "expected a positive"), ("4", 2, "this job has 2 processes")])
def test_bad_device_counts_name_the_variable(value, processes, message):
    with pytest.raises(ember.EmberError, match=f"EMBER_CPU_DEVICES={value!r}.*{message}"):
        _devices_per_process(value, processes)


def test_device_count_defaults_to_one_and_reads_the_variable_in_a_fresh_process():
    code = "from ember import parallel as P; print(P.device_count())"
    env = {k: v for k, v in __import__("os").environ.items() if k != "EMBER_CPU_DEVICES"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "1"
    bad = subprocess.run([sys.executable, "-c", code], env={**env, "EMBER_CPU_DEVICES": "x"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "EMBER_CPU_DEVICES='x'" in bad.stderr


# --- meshes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n, k, expected", [
    (8, 1, (8,)), (8, 2, (4, 2)), (8, 3, (2, 2, 2)), (16, 3, (4, 2, 2)), (12, 3, (3, 2, 2)),
    (6, 2, (3, 2)), (7, 2, (7, 1)), (1, 2, (1, 1)), (4, 2, (2, 2))])
def test_flat_devices_factor_evenly_larger_first(n, k, expected):
    assert _even_factors(n, k) == expected


def test_mesh_from_a_flat_list():
    mesh = P.Mesh(P.devices(), ("dp", "tp"))
    assert mesh.shape == {"dp": 4, "tp": 2}
    assert mesh.axis_names == ("dp", "tp") and mesh.size == 8
    assert mesh.abstract == (("dp", 4), ("tp", 2))
    assert mesh.devices.shape == (4, 2) and mesh.devices[1, 0] is P.devices()[2]
    assert mesh.coordinates(P.devices()[5]) == {"dp": 2, "tp": 1}
    assert mesh.local_devices == P.devices()
    assert "dp=4, tp=2" in repr(mesh)
    one = P.Mesh(P.devices()[:2], "x")
    assert one.shape == {"x": 2}


def test_mesh_from_a_grid_and_with_a_shape():
    ds = P.devices()
    grid = [[ds[0], ds[2]], [ds[1], ds[3]]]
    mesh = P.Mesh(grid, ("a", "b"))
    assert mesh.shape == {"a": 2, "b": 2}
    assert mesh.coordinates(ds[2]) == {"a": 0, "b": 1}
    assert P.Mesh(np.array(ds[:8], dtype=object).reshape(2, 4), ("a", "b")).shape == \
        {"a": 2, "b": 4}
    shaped = P.Mesh(ds, ("a", "b", "c"), shape=(2, 1, 4))
    assert shaped.shape == {"a": 2, "b": 1, "c": 4}
    assert shaped.coordinates(ds[6]) == {"a": 1, "b": 0, "c": 2}
    assert P.Mesh(ds[:4], ("a", "b")) == P.Mesh(ds[:4], ("a", "b"), shape=(2, 2))
    assert P.Mesh(ds[:4], ("a", "b")) != P.Mesh(ds[:4], ("a", "b"), shape=(4, 1))
    assert len({P.Mesh(ds[:4], ("a", "b")), P.Mesh(ds[:4], ("a", "b"))}) == 1


@pytest.mark.parametrize("build, message", [
    (lambda ds: P.Mesh(ds[:6], ("a", "b"), shape=(4, 2)), r"shape \(4, 2\) holds 8 devices, "
                                                         r"but 6 were given"),
    (lambda ds: P.Mesh(ds[:4], ("a", "a")), "axis name 'a' appears twice"),
    (lambda ds: P.Mesh([ds[0], ds[1], ds[0], ds[2]], ("a",)), r"Device\(cpu:0.*appears twice"),
    (lambda ds: P.Mesh([[ds[0], ds[1]], [ds[2], ds[3]]], ("a",)), "1 axis names"),
    (lambda ds: P.Mesh(ds[:4], ("a", "_")), "reserved"),
    (lambda ds: P.Mesh(ds[:4], ("a", "b c")), "identifiers"),
    (lambda ds: P.Mesh([0, 1], ("a",)), "expected ember.parallel.Device"),
    (lambda ds: P.Mesh([], ("a",)), "non-empty"),
    (lambda ds: P.Mesh([[ds[0], ds[1]], [ds[2]]], ("a", "b")), "different lengths"),
])
def test_mesh_errors(build, message):
    with pytest.raises(ember.EmberError, match=message) as e:
        build(P.devices())
    assert str(e.value).startswith("Mesh: ") and "test_parallel_sharding.py" in str(e.value)


def test_coordinates_of_a_foreign_device():
    mesh = P.Mesh(P.devices()[:2], ("x",))
    with pytest.raises(ember.EmberError, match=r"Device\(cpu:5.*is not in Mesh"):
        mesh.coordinates(P.devices()[5])


# --- PartitionSpec and NamedSharding ----------------------------------------------------------

def test_partition_spec_is_a_tuple_of_entries():
    spec = P.PartitionSpec("dp", None, ("tp", "sp"))
    assert tuple(spec) == ("dp", None, ("tp", "sp")) and len(spec) == 3
    assert spec.axes() == ["dp", "tp", "sp"]
    assert repr(spec) == "PartitionSpec('dp', None, ('tp', 'sp'))"
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert P.PartitionSpec() == ()
    with pytest.raises(ShardingError, match="PartitionSpec: each entry must be None"):
        P.PartitionSpec("dp", 1)


def test_named_sharding_abstract_and_shapes():
    mesh = P.Mesh(P.devices(), ("dp", "tp"))
    s = P.NamedSharding(mesh, P.PartitionSpec("dp"))
    assert s.abstract(2) == Sharding(mesh.abstract, ("dp", None))
    assert str(s.abstract(3)) == "{dp,_,_}"
    assert s.shard_shape((8, 6)) == (2, 6)
    both = P.NamedSharding(mesh, (("dp", "tp"), None))
    assert both.shard_shape((16, 3)) == (2, 3)
    assert s == P.NamedSharding(mesh, P.PartitionSpec("dp", None))  # trailing None: same
    assert hash(s) == hash(P.NamedSharding(mesh, ("dp", None)))
    assert s != P.NamedSharding(mesh, P.PartitionSpec(None, "dp"))
    assert P.NamedSharding(mesh, P.PartitionSpec()).is_fully_replicated
    assert P.NamedSharding.from_abstract(mesh, both.abstract(2)) == both
    assert P.NamedSharding.from_abstract(mesh, s.abstract(2)) == s


@pytest.mark.parametrize("spec", [P.PartitionSpec(), P.PartitionSpec("dp"),
                                  P.PartitionSpec(None, "tp"), P.PartitionSpec("tp", "dp"),
                                  P.PartitionSpec(("dp", "tp")), P.PartitionSpec(None, ("tp",
                                                                                        "dp"))])
def test_indices_tile_the_value_once_per_copy(spec):
    """Every device gets a block of the local shape; together the blocks cover the value,
    each element held by as many devices as the unsplit mesh axes multiply to."""
    mesh = P.Mesh(P.devices(), ("dp", "tp"))
    s = P.NamedSharding(mesh, spec)
    shape = (8, 16)
    idx = s.indices(shape)
    assert set(idx) == set(P.devices())
    count = np.zeros(shape, int)
    for d, index in idx.items():
        assert count[index].shape == s.shard_shape(shape)
        count[index] += 1
    unsplit = int(np.prod([n for a, n in mesh.shape.items() if a not in spec.axes()]))
    assert (count == unsplit).all()


@pytest.mark.parametrize("build, message", [
    (lambda m: P.NamedSharding(m, P.PartitionSpec("xx")), "names mesh axis 'xx', but the mesh"),
    (lambda m: P.NamedSharding(m, P.PartitionSpec("dp", "dp")), "uses mesh axis 'dp' twice"),
    (lambda m: P.NamedSharding(m, P.PartitionSpec(("tp", "dp"), "tp")), "'tp' twice"),
    (lambda m: P.NamedSharding("mesh", P.PartitionSpec()), "expected an ember.parallel.Mesh"),
    (lambda m: P.NamedSharding(m, ("dp", None, None)).abstract(2), "has 3 entries, but the "
                                                                   "value has 2 dimensions"),
    (lambda m: P.NamedSharding(m, ("dp",)).shard_shape((6, 3)),
     r"shape \(6, 3\) cannot be laid out as PartitionSpec\('dp'\).*dimension 0 of size 6 "
     r"does not divide evenly over mesh axis 'dp' \(size 4\)"),
])
def test_named_sharding_errors_name_spec_axis_and_line(build, message):
    mesh = P.Mesh(P.devices(), ("dp", "tp"))
    with pytest.raises(ShardingError, match=message) as e:
        build(mesh)
    assert "test_parallel_sharding.py" in str(e.value)
