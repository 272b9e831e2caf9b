"""One thin module per stage; each exposes ``run(ctx, **inputs) -> dict[str, Artifact]``."""
