"""Training: the trainer, optimizers and schedules, checkpoints, metrics, progress.

    from jaxsun.train import Trainer, TrainConfig, OptimizerConfig, Checkpointer
    trainer = Trainer(split, TrainConfig(steps=200, trainability="prefill"))
    trainer.fit(batches, writer=create_default_writer(workdir), checkpointer=Checkpointer(d))

Imports jax, optax and orbax only; tensorboardX, tqdm and matplotlib load on use.
"""

from jaxsun.train.checkpoints import Checkpointer
from jaxsun.train.metrics import (JsonlWriter, MetricWriter, MultiWriter,
                                  TensorBoardWriter, create_default_writer, plot_curves,
                                  read_jsonl)
from jaxsun.train.optim import SCHEDULES, OptimizerConfig, make_optimizer, make_schedule
from jaxsun.train.progress import Progress
from jaxsun.train.trainer import TrainConfig, Trainer, TrainState

__all__ = [
    "Checkpointer", "JsonlWriter", "MetricWriter", "MultiWriter", "TensorBoardWriter",
    "create_default_writer", "plot_curves", "read_jsonl", "SCHEDULES", "OptimizerConfig",
    "make_optimizer", "make_schedule", "Progress", "TrainConfig", "Trainer", "TrainState",
]
