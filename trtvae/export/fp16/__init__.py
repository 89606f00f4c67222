"""fp16 safety: measure how close each activation comes to fp16's limit, decide, and rescale exactly.

The path is collect, then judge (Polygraphy's Comparator habit): `audit.audit_model` measures,
`decide.decide` chooses (a pure function), `rescale` rewrites a copy along the `plan`, `report` shows and writes;
`safety` runs them in that order for `vae-export --precision fp16` and `vae-export audit`.
"""
