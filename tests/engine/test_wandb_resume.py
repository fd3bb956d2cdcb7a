"""A resumed run continues the same wandb run (offline): the id is kept in the run folder."""
from rlhf_engine.config import load_recipe
from rlhf_engine.sft import train_sft
from helpers import REPO


def test_resumed_run_logs_to_the_same_wandb_run(tmp_path, restore_env):
    recipe = load_recipe(REPO / "recipes/tiny/sft-zero3.yaml", [
        f"output_dir={tmp_path}", "deepspeed.zero_stage=0", "train.steps=2", "train.eval_size=4", "num_threads=2",
        "checkpoint.save_every=1", "logging.wandb.mode=offline"])
    run = tmp_path / recipe.name
    train_sft(recipe)
    first = (run / "wandb_id").read_text().strip()
    train_sft(recipe, resume=str(run / "checkpoints" / "step-1"))
    assert (run / "wandb_id").read_text().strip() == first
    offline_runs = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(name.endswith(f"-{first}") for name in offline_runs), offline_runs

    train_sft(recipe)  # a fresh run under the same name: the earlier one is moved aside, a new wandb run starts
    assert (run / "wandb_id").read_text().strip() != first
