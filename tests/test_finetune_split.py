"""The fine-tuning study: its three variants build and validate; `:tiny` end to end at a
smoke size (learning rates chosen on validation, seeds, mean ± std, table, plot)."""

import json

import numpy as np
import pytest

from configs import finetune_split as fs_config
from jaxsun import jobs
from jaxsun.jobs import finetune_split as fs


def test_variants_build_validate_and_state_their_cost():
  tiny = fs_config.get_config("tiny")
  cost = fs.expected_cost(tiny)
  assert cost["finetune_runs"] == 3 * (3 * 4 + 3 * 5 + 6 * 2) == 117
  assert cost["model_params"] == 213_760
  assert len(tiny.tasks) >= 3 and len(tiny.seeds) == 3
  assert set(tiny.regimes) == {"full", "prefill", "decode", "none", "full_lora",
                               "prefill_lora", "decode_lora"}
  gpu = fs.expected_cost(fs_config.get_config("gpu"))
  assert gpu["finetune_runs"] == 72 and 9e6 < gpu["model_params"] < 11e6
  assert fs_config.get_config() == tiny  # the default variant
  with pytest.raises(ValueError, match="unknown variant"):
    fs_config.get_config("huge")
  with pytest.raises(AttributeError):
    tiny.finetune.stepz = 1  # locked


def test_paper_variant_names_what_is_missing(tmp_path):
  paper = fs_config.get_config("paper")
  assert paper.model.preset == "llama-3.1-8b"
  assert set(paper.tasks) == {"metamathqa", "evol_instruct_code", "xlam_function_calling"}
  with pytest.raises(ValueError, match="config.tokenizer is empty"):
    fs.check_config(paper)
  paper.tokenizer = "byte"
  with pytest.raises(ValueError, match="config.base.checkpoint is empty"):
    fs.check_config(paper)
  paper.base.checkpoint = str(tmp_path / "ckpt")
  with pytest.raises(FileNotFoundError, match="config.base.checkpoint=.* is not a directory"):
    fs.check_config(paper)
  (tmp_path / "ckpt").mkdir()
  with pytest.raises(ValueError, match="config.data.files.metamathqa is empty"):
    fs.check_config(paper)
  for name in paper.tasks:
    paper.data.files[name] = str(tmp_path / f"{name}.json")
  with pytest.raises(FileNotFoundError, match="config.data.files.metamathqa"):
    fs.check_config(paper)
  fields = {"metamathqa": ("query", "response"), "evol_instruct_code": ("instruction", "output"),
            "xlam_function_calling": ("query", "answers")}
  for name, (q, a) in fields.items():
    recs = [{q: f"question {i}", a: f"answer {i}", "tools": "[]"} for i in range(50)]
    (tmp_path / f"{name}.json").write_text(json.dumps(recs))
  parts = fs.check_config(paper)
  # Llama-3.1-8B shapes: its 8,030,261,248 parameters with a 259-token (byte) vocabulary
  # in place of 128,256 (untied embedding and head).
  assert parts["model"].num_params() == 8_030_261_248 - 2 * (128_256 - 259) * 4096
  cost = fs.expected_cost(paper)
  assert cost["finetune_flops_upper_bound"] > 1e18


def smoke_config(**overrides):
  c = fs_config.get_config("tiny")
  c.tasks = ("rotate_matrix",)
  c.regimes = ("full", "prefill", "decode", "none", "prefill_lora")
  c.seeds = (0, 1)
  c.lr_grid.full = (1e-3, 3e-3)
  c.lr_grid.prefill = (3e-3,)
  c.lr_grid.decode = (3e-3,)
  c.lr_grid.prefill_lora = (1e-2,)
  c.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64)
  c.pretrain.update(steps=4, batch_size=4, seq_len=64, eval_batches=1, eval_every=4,
                    log_every=2, checkpoint_every=4)
  c.pretrain.optimizer.warmup_steps = 1
  c.finetune.update(steps=3, batch_size=4, log_every=1)
  c.finetune.optimizer.warmup_steps = 1
  c.eval.update(validation_items=8, test_items=8, batch_size=8)
  for k, v in overrides.items():
    c[k] = v
  return c


def test_tiny_runs_end_to_end_at_a_smoke_size(tmp_path):
  cfg = smoke_config()
  res = jobs.run(cfg, tmp_path)
  same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaNs
  assert same(json.loads((tmp_path / "results.json").read_text())["summary"], res["summary"])
  assert (tmp_path / "finetune_split.png").read_bytes()[:4] == b"\x89PNG"
  table = (tmp_path / "table.md").read_text()
  for task in cfg.tasks:
    sel = res["lr_selection"][task]
    trials = sel["full"]["trials"]
    best = max(trials, key=lambda lr: (trials[lr]["validation_accuracy"],
                                       -trials[lr]["validation_loss"]))
    assert f"{sel['full']['chosen']:g}" == best  # chosen on validation, by the rule
    assert set(trials) == {"0.001", "0.003"}
    for regime in cfg.regimes:
      runs = res["per_seed"][task][regime]
      assert len(runs) == len(cfg.seeds)
      acc = [r["test_accuracy"] for r in runs]
      s = res["summary"][task][regime]
      assert s["accuracy"]["mean"] == pytest.approx(np.mean(acc))
      assert s["accuracy"]["std"] == pytest.approx(np.std(acc, ddof=1))
      assert s["loss"]["mean"] == pytest.approx(np.mean([r["test_loss"] for r in runs]))
      assert all(r["test_items"] == cfg.eval.test_items for r in runs)
      if regime != "none":
        assert [r["seed"] for r in runs] == list(cfg.seeds)
        assert all(r["learning_rate"] == s["learning_rate"] for r in runs)
        assert f"| {task} | {regime} | {s['learning_rate']:g} |" in table
      if regime == "prefill":
        assert all(r["shared_decode_tree_unchanged"] for r in runs)
      if regime == "decode":
        assert all(r["shared_prefill_tree_unchanged"] for r in runs)
      if regime == "prefill_lora":
        assert all(r["adapted_tree_base_unchanged"] and r["shared_decode_tree_unchanged"]
                   for r in runs)
        assert all(r["trainable_params"] == r["adapter_params"] for r in runs)
    # Seeds differ: the fine-tuning data order and adapters are seeded.
    full = res["per_seed"][task]["full"]
    assert full[0]["final_train_loss"] != full[1]["final_train_loss"]
  # A rerun reuses every finished run: same numbers.
  again = jobs.run(cfg, tmp_path)
  assert same(again["summary"], res["summary"])


def test_bad_study_configs_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="config.tasks: unknown task 'spell'"):
    fs.check_config(smoke_config(tasks=("spell",)))
  with pytest.raises(ValueError, match="unknown regime in config.regimes 'sun'"):
    fs.check_config(smoke_config(regimes=("full", "sun")))
  with pytest.raises(ValueError, match="must include 'full'"):
    fs.check_config(smoke_config(regimes=("prefill",)))
  cfg = smoke_config()
  cfg.lr_grid.prefill = ()
  with pytest.raises(ValueError, match="config.lr_grid.prefill must be a non-empty"):
    fs.check_config(cfg)
  with pytest.raises(ValueError, match="config.seeds is empty"):
    fs.check_config(smoke_config(seeds=()))
  cfg = smoke_config()
  cfg.finetune.lora.rank = 0
  with pytest.raises(ValueError, match="config.finetune.lora: LoRAConfig.rank"):
    fs.check_config(cfg)


def test_paper_memory_estimate_fits_eight_gpus_and_refuses_one(tmp_path):
  paper = fs_config.get_config("paper")
  paper.tokenizer = "byte"
  paper.base.checkpoint = str(tmp_path)
  fields = {"metamathqa": ("query", "response"), "evol_instruct_code": ("instruction", "output"),
            "xlam_function_calling": ("query", "answers")}
  for name, (q, a) in fields.items():
    paper.data.files[name] = str(tmp_path / f"{name}.json")
    (tmp_path / f"{name}.json").write_text(json.dumps(
        [{q: f"question {i}", a: f"answer {i}", "tools": "[]"} for i in range(50)]))
  cost = fs.expected_cost(paper)  # fsdp=8: every regime fits an 80 GB device
  assert cost["mesh"] == (1, 8, 1)
  assert all(0 < gib < 72 for gib in cost["memory_per_device_gib"].values()), cost
  est = fs.check_config(paper)["memory"]
  assert est["prefill"].params == 2 * est["full"].params  # an untied split holds two trees
  assert est["prefill_lora"].trainable_state < est["prefill"].trainable_state / 100
  paper.mesh.fsdp = 1  # one GPU: full-weight regimes cannot fit
  with pytest.raises(ValueError, match=r"config.device_memory_gb=80 .*regime 'full'.*GiB"):
    fs.check_config(paper)
