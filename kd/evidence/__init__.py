"""The evidence of a run: what `write_evidence` leaves in `evidence/<run>/`, and everything that reads it.

    manifest.py   the manifest's schema, its atomic writer and its reader (imports none of the others below
                  but verdicts and redact)
    verdicts.py   the falsifiers and the run's status, computed from recorded numbers only
    verify.py     integrity and honesty of a run folder (every sha256, every verdict recomputed) and of a sweep's
    view.py       `kdflow evidence show` / `diff`: human views, never a PASS that verification refutes
    signing.py    Ed25519 signatures over manifest.json
    redact.py     secrets never reach a log, an artifact or the manifest

Imports point one way: verify and view read manifests; the manifest module imports neither.
"""
