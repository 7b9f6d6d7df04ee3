"""The trl export feeds TRL as its own data would: reference log-probs DPOTrainer accepts, no margin for RewardTrainer.

A tiny random llama (SmolLM2's tokenizer and chat template) scores real HH
pairs in fp32; TRL then trains on the export on CPU.
"""

import math

import numpy as np
import polars as pl
import pytest
import torch

from curate.errors import CurateError
from curate.export import export_curated
from curate.rundir import RunDir
from curate.score import score
from tests.conftest import write_hh_head

N_PAIRS = 6

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("trl")
    data = write_hh_head(root / "hh.jsonl.gz", N_PAIRS)
    score(str(data), model=str(tiny_model_dir), out=root / "run", scores="logps", dtype="fp32", device="cpu")
    return root / "run"


@pytest.fixture(scope="module")
def exported(scored_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "trl"
    summary = export_curated(scored_run, "trl", out)
    return summary, datasets.load_dataset("parquet", data_files=str(out / "train.parquet"), split="train")


def _dpo_config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=N_PAIRS, max_length=None,
                    precompute_ref_log_probs=True, report_to=[], use_cpu=True, bf16=False, seed=0,
                    dataloader_drop_last=False, logging_steps=1, max_steps=1)
    settings.update(overrides)
    return trl.DPOConfig(**settings)


def _policy(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), AutoTokenizer.from_pretrained(tiny_model_dir)


def _step0_loss(trainer) -> float:
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()  # no dropout in llama; eval only silences train-mode bookkeeping
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, batch))


def test_reference_columns_equal_trls_own_precompute_and_the_step0_loss_is_log2(exported, tiny_model_dir, tmp_path):
    summary, dataset = exported
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(dataset.column_names)
    assert summary["trl_max_length_needed"] > 0
    assert len(dataset) == N_PAIRS

    # TRL's own precompute, from the same rows without curate's columns
    model, tokenizer = _policy(tiny_model_dir)
    plain = dataset.select_columns(["prompt", "chosen", "rejected"])
    trl_trainer = trl.DPOTrainer(model=model, args=_dpo_config(tmp_path / "a"), train_dataset=plain,
                                 processing_class=tokenizer)
    theirs = {c: np.asarray(trl_trainer.train_dataset[c], dtype=float) for c in ("ref_chosen_logps", "ref_rejected_logps")}

    ours = {c: np.asarray(dataset[c], dtype=float) for c in ("ref_chosen_logps", "ref_rejected_logps")}
    for column in ours:
        np.testing.assert_allclose(ours[column], theirs[column], rtol=1e-5, err_msg=column)

    # curate's columns used as they are: TRL must not recompute them
    from curate.trl_reference import dpo_trainer_with_reference

    model, tokenizer = _policy(tiny_model_dir)
    trainer_cls = dpo_trainer_with_reference()
    trainer_cls.compute_ref_log_probs = lambda *a, **k: pytest.fail("recomputed the reference log-probs")
    ours_trainer = trainer_cls(model=model, args=_dpo_config(tmp_path / "b"), train_dataset=dataset,
                               processing_class=tokenizer)
    assert ours_trainer.ref_model is None  # no second model in memory
    loss_ours, loss_theirs = _step0_loss(ours_trainer), _step0_loss(trl_trainer)
    assert loss_ours == pytest.approx(math.log(2), abs=1e-5)
    assert loss_ours == pytest.approx(loss_theirs, abs=1e-5)


def test_reference_columns_follow_a_flip(scored_run, tmp_path):
    """A pair curation flipped gets its reference log-probs swapped with its replies."""
    run = RunDir(scored_run)
    pairs = run.pairs()
    flipped = pairs.with_columns(
        chosen=pl.when(pl.int_range(pl.len()) == 0).then(pl.col("rejected")).otherwise(pl.col("chosen")),
        rejected=pl.when(pl.int_range(pl.len()) == 0).then(pl.col("chosen")).otherwise(pl.col("rejected")),
        flipped=pl.int_range(pl.len()) == 0,
    )
    curated = RunDir(tmp_path / "cur")
    curated.write_pairs(flipped, run.quarantine())
    curated.merge_scores(run.scores())
    curated.update_manifest("score", run.manifest()["score"])
    export_curated(curated.path, "trl", tmp_path / "out")
    out = pl.read_parquet(tmp_path / "out/train.parquet")
    first = run.scores().filter(pl.col("pair_id") == pairs["pair_id"][0])
    assert out["ref_chosen_logps"][0] == pytest.approx(first["logp_rejected"][0])
    assert out["ref_rejected_logps"][0] == pytest.approx(first["logp_chosen"][0])
    assert out["chosen"][0].startswith(pairs["rejected"][0])


def test_reference_export_needs_log_prob_scores(scored_run, tmp_path):
    run = RunDir(scored_run)
    bare = RunDir(tmp_path / "bare")
    bare.write_pairs(run.pairs(), run.quarantine())
    with pytest.raises(CurateError, match="--scores logps"):
        export_curated(bare.path, "trl", tmp_path / "out", ref_logps=True)
    export_curated(bare.path, "trl", tmp_path / "conv")  # without logps: the conversational rows
    assert isinstance(pl.read_parquet(tmp_path / "conv/train.parquet")["prompt"][0], pl.Series)


def _reward_loss(dataset, tiny_model_dir, tmp_path) -> float:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig.from_pretrained(tiny_model_dir, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).float()
    args = trl.RewardConfig(output_dir=str(tmp_path), per_device_train_batch_size=N_PAIRS, max_length=None,
                            report_to=[], use_cpu=True, bf16=False, seed=0, max_steps=1)
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, batch))


def test_reward_trainer_loss_ignores_curates_columns(scored_run, tmp_path, tiny_model_dir):
    """curate's margin is exported as curate_margin; a column named margin would shift RewardTrainer's loss."""
    import shutil

    run = RunDir(shutil.copytree(scored_run, tmp_path / "run"))
    run.merge_scores(run.scores().select("pair_id").with_columns(rm_margin_mean=pl.Series(np.linspace(-3, 3, N_PAIRS))))
    export_curated(run.path, "trl", tmp_path / "out")
    dataset = datasets.load_dataset("parquet", data_files=str(tmp_path / "out/train.parquet"), split="train")
    assert "curate_margin" in dataset.column_names and "margin" not in dataset.column_names

    with_curate = _reward_loss(dataset, tiny_model_dir, tmp_path / "a")
    without = _reward_loss(dataset.select_columns(["prompt", "chosen", "rejected"]), tiny_model_dir, tmp_path / "b")
    assert with_curate == pytest.approx(without, abs=1e-7)
    shifted = _reward_loss(dataset.rename_column("curate_margin", "margin"), tiny_model_dir, tmp_path / "c")
    assert abs(shifted - without) > 1e-3  # the column name TRL reads does change the loss
