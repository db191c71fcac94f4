"""lm-eval task YAMLs over local JSONL (rebuilt by scripts/build_harness_tasks.py)."""

SHIPPED_TASKS = ("jaxsun_letter_counting_mc", "jaxsun_spell_backward_gen",
                 "jaxsun_shakespeare_ppl")
