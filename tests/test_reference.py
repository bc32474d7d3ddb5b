"""The README's config reference is the one generated from the schema."""

from pathlib import Path

from crossdistill import reference

README = Path(__file__).parents[1] / "README.md"


def test_readme_reference_is_generated():
    assert reference.readme_section(README.read_text()) == reference.generate(), (
        f"README config reference is stale; regenerate: {reference.REGENERATE}"
    )


def test_reference_covers_every_train_field_and_registry():
    from crossdistill import registry as R
    from crossdistill.config import TrainSpec

    text = reference.generate()
    for name in TrainSpec.model_fields:
        assert f"| `{name}` |" in text
    for name in [*R.LOSSES.names(), *R.METHODS.names(), *R.MODELS.names()]:
        assert f"| `{name}` |" in text
    for word in ("Nesterov", "checkpoint_every", "grad_clip", "$CROSSDISTILL_DATA", "min_lr"):
        assert word in text
