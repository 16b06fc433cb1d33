"""The IR: typed values, equations and graphs, their printer, verifier and rewrite passes."""

from ember.ir.graph import ClosedGraph, Eqn, Graph, Literal, Var
from ember.ir.types import ArrayType

__all__ = ["ArrayType", "ClosedGraph", "Eqn", "Graph", "Literal", "Var"]
