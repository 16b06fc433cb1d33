"""The backend-neutral compiler: passes over the IR that every compiled backend shares
(fusion grouping, memory planning)."""
