"""The reproducible pipeline: DVC stages (prepare -> train -> report) over the ``sasa`` library."""
