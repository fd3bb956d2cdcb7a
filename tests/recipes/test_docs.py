"""docs/config.md is generated from the schema and must be current; the README's quickstart is the
two Makefile commands."""
from helpers import REPO, load_launch_script


def test_config_reference_is_current():
    gen = load_launch_script("gen_docs")
    assert (REPO / "docs" / "config.md").read_text() == gen.render(), \
        "docs/config.md is stale: run `python launch/gen_docs.py` and commit the result"


def test_config_reference_lists_every_key_with_its_description():
    from rlhf_engine.config import CpuConfig, Recipe

    text = (REPO / "docs" / "config.md").read_text()
    for name, field in {**Recipe.model_fields, **{f"cpu.{k}": v for k, v in CpuConfig.model_fields.items()}}.items():
        assert f"`{name}`" in text and field.description.split("(")[0].strip() in text, name


def test_readme_quickstart_is_make_demo_and_make_test():
    readme = (REPO / "README.md").read_text()
    quick = readme.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in quick.strip().splitlines()] == ["make demo", "make test"]
    assert "python launch/gen_docs.py" in readme and "docs/benchmarks.md" in readme
