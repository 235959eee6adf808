"""Verify: every raw completion judged by its domain's verifier (`verifiers/`) and the quality filters, into
`RUN/verified/`. Never calls the teacher. The stage itself is `stage.verify_run` (and `stage.verify_file`)."""
