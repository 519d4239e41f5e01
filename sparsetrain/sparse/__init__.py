"""Sparse attention methods, one file each.

A method file holds its frozen options class (a `BlockSparseOptions` subclass registered by name in
`sparsetrain.attention.spec.METHODS`), its NNX module (a `SparseMethod`: select -> attend -> losses
and metrics), its export table (`MethodExport`, with the torch file
`sparsetrain/export/torch/<name>.py`) and its density accounting. The conformance suite in
tests/sparse/ runs every registered method through the same checks.
"""
