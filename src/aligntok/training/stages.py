"""AlignTok's three tokenizer training stages, as data, and the pipeline that runs them.

The table :data:`STAGES` says, for each stage, which parts of the tokenizer train, whether the semantic
preservation loss is on, whether an EMA is kept, and whose output the stage starts from. Everything else
(freezing, optimizer groups, where weights are loaded from) is derived from that table, so a test can
assert it and a reader can see the method at a glance.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
from torch import nn

from aligntok.config import ConfigError, DataConfig, OptimConfig, TrainConfig
from aligntok.losses.reconstruction import ReconLossConfig, ReconstructionLoss
from aligntok.losses.semantic import SemanticLossConfig, SemanticPreservationLoss
from aligntok.models.tokenizer import AlignTokTokenizer, TokenizerConfig

log = logging.getLogger(__name__)

PARTS = ("encoder", "adapter", "decoder")


@dataclasses.dataclass(frozen=True)
class Stage:
    number: int
    name: str
    trains: frozenset[str]  #: tokenizer parts whose weights change
    semantic_loss: bool  #: L_rec + w_sp * L_sp instead of L_rec alone
    keeps_ema: bool  #: EMA of the tokenizer is kept (and exported) in this stage
    starts_from: int | None  #: the stage whose output this one loads; None = pretrained encoder, fresh adapter/decoder


STAGES: dict[int, Stage] = {
    1: Stage(1, "latent alignment", frozenset({"adapter", "decoder"}), False, False, None),
    2: Stage(2, "perceptual alignment", frozenset(PARTS), True, True, 1),
    3: Stage(3, "decoder refinement", frozenset({"decoder"}), False, False, 2),
}


@dataclasses.dataclass
class StageConfig:
    """Length and optimisation of one stage."""

    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)  #: loop, batch, EMA, checkpoints
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)  #: the tokenizer's optimizer
    disc_optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)  #: the discriminator's optimizer
    init_from_ema: bool = True  #: start from the previous stage's EMA weights when it kept an EMA


@dataclasses.dataclass
class TokenizerTrainConfig:
    """Everything `aligntok train-tokenizer` needs."""

    model: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: ReconLossConfig = dataclasses.field(default_factory=ReconLossConfig)  #: L_rec, every stage
    semantic: SemanticLossConfig = dataclasses.field(default_factory=SemanticLossConfig)  #: L_sp, stage 2
    stage1: StageConfig = dataclasses.field(default_factory=StageConfig)
    stage2: StageConfig = dataclasses.field(default_factory=lambda: StageConfig(train=TrainConfig(ema_decay=0.9999)))
    stage3: StageConfig = dataclasses.field(default_factory=StageConfig)

    def stage(self, number: int) -> StageConfig:
        return getattr(self, f"stage{number}")

    def validate(self) -> None:
        stride = 2 ** (len(self.model.decoder.channel_mult) - 1)
        if self.data.resolution % stride:
            raise ConfigError(f"data.resolution={self.data.resolution} is not a multiple of the tokenizer stride {stride}")
        if any(self.stage(n).train.fsdp for n in STAGES):
            # The adaptive GAN weight differentiates w.r.t. the decoder's whole last layer, not a shard.
            raise ConfigError("train.fsdp is not supported for tokenizer stages; they train data-parallel")


def apply_stage(tokenizer: AlignTokTokenizer, stage: Stage) -> None:
    """Freeze what the stage does not train: no gradient, eval mode (so no dropout / stat updates)."""
    for part in PARTS:
        module: nn.Module = getattr(tokenizer, part)
        trains = part in stage.trains
        module.requires_grad_(trains)
        module.train(trains)


class TokenizerStageTask:
    """One stage of tokenizer training as an engine task: generator and discriminator losses."""

    def __init__(
        self,
        tokenizer: AlignTokTokenizer,
        stage: Stage,
        recon_loss: ReconstructionLoss,
        semantic: SemanticPreservationLoss | None,
    ):
        if stage.semantic_loss != (semantic is not None):
            raise ValueError(f"stage {stage.number} needs semantic loss={stage.semantic_loss}")
        self.tokenizer, self.stage, self.recon_loss, self.semantic = tokenizer, stage, recon_loss, semantic
        apply_stage(tokenizer, stage)

    def modules(self) -> dict[str, nn.Module]:
        return {"tokenizer": self.tokenizer, "discriminator": self.recon_loss.discriminator}

    def optimizers(self) -> dict[str, list[nn.Parameter]]:
        return {
            "generator": [p for p in self.tokenizer.parameters() if p.requires_grad],
            "discriminator": list(self.recon_loss.discriminator.parameters()),
        }

    def ema_modules(self) -> list[str]:
        return ["tokenizer"] if self.stage.keeps_ema else []

    def train_mode(self) -> None:
        """Called by the engine instead of module.train(): frozen parts stay in eval mode."""
        apply_stage(self.tokenizer, self.stage)
        self.recon_loss.discriminator.train()

    def losses(self, batch: dict, step: int) -> dict[str, tuple[torch.Tensor, dict]]:
        x = batch["image"]
        tok = self.tokenizer
        with torch.set_grad_enabled("encoder" in self.stage.trains):
            pre = tok.encoder(x)
        with torch.set_grad_enabled(bool({"encoder", "adapter"} & self.stage.trains)):
            post = tok.adapter(pre)
        recon = tok.decode(post)
        total, logs = self.recon_loss.generator_loss(x, recon, step, tok.decoder.last_layer)
        if self.semantic is not None:
            sp, sp_logs = self.semantic(x, pre, post)  # already weighted by w_sp
            total = total + sp
            logs = {**logs, **sp_logs}
        out = {"generator": (total, logs)}
        disc = self.recon_loss.discriminator_loss(x, recon.detach(), step)
        if disc is not None:
            out["discriminator"] = disc
        return out


def stage_output_dir(run_dir: Path, number: int) -> Path:
    """Where a stage leaves its tokenizer (a save_pretrained directory)."""
    return Path(run_dir) / f"stage{number}"


def stage_train_dir(run_dir: Path, number: int) -> Path:
    """Where a stage's trainer keeps its log, resolved config and checkpoints."""
    return Path(run_dir) / "train" / f"stage{number}"


def _require_stage_output(run_dir: Path, number: int, needed_by: int) -> Path:
    path = stage_output_dir(run_dir, number)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"stage {needed_by} starts from stage {number}'s output {path}, which does not exist: "
            f"run `aligntok train-tokenizer ... --stage {number}` first"
        )
    return path


def build_stage_tokenizer(cfg: TokenizerTrainConfig, run_dir: Path, stage: Stage) -> AlignTokTokenizer:
    """The tokenizer a stage starts from: a fresh one for stage 1, else the previous stage's output."""
    if stage.starts_from is None:
        torch.manual_seed(cfg.stage(stage.number).train.seed)
        return AlignTokTokenizer.from_config(cfg.model)
    previous = STAGES[stage.starts_from]
    source = _require_stage_output(run_dir, previous.number, stage.number)
    tokenizer = AlignTokTokenizer.from_pretrained(source)
    if previous.keeps_ema and not cfg.stage(stage.number).init_from_ema:
        # The exported directory holds the EMA weights; the raw ones live in the last checkpoint.
        from aligntok.training.checkpoint import load_module_weights

        load_module_weights(stage_train_dir(run_dir, previous.number), "tokenizer", tokenizer)
    return tokenizer


def build_semantic_loss(cfg: TokenizerTrainConfig, run_dir: Path) -> SemanticPreservationLoss:
    """The frozen stage-1 encoder+adapter, rebuilt from stage 1's output (never from a checkpoint)."""
    teacher = AlignTokTokenizer.from_pretrained(_require_stage_output(run_dir, 1, 2))
    return SemanticPreservationLoss(cfg.semantic, encoder=teacher.encoder, adapter=teacher.adapter)


def train_tokenizer(
    cfg: TokenizerTrainConfig, run_dir: str | Path, stages: tuple[int, ...] = (1, 2, 3)
) -> dict[int, Path]:
    """Run the given stages in order; each leaves a loadable tokenizer in ``run_dir/stageN``.

    A stage whose output already exists is skipped, and an interrupted stage resumes from its latest
    checkpoint, so re-running the same command continues where it stopped.
    """
    from aligntok.data import build_dataset, build_loader
    from aligntok.training.distributed import init_distributed
    from aligntok.training.trainer import Trainer

    run_dir = Path(run_dir)
    dist = init_distributed()
    dataset = build_dataset(
        cfg.data.train, cfg.data.resolution, hflip=cfg.data.hflip, seed=cfg.stage1.train.seed,
        builtin_size=cfg.data.builtin_size,
    )
    outputs: dict[int, Path] = {}
    for number in stages:
        stage, stage_cfg = STAGES[number], cfg.stage(number)
        out = stage_output_dir(run_dir, number)
        if (out / "config.json").is_file():
            log.info("stage %d (%s): output %s exists, skipping", number, stage.name, out)
            outputs[number] = out
            continue
        started = time.perf_counter()
        tokenizer = build_stage_tokenizer(cfg, run_dir, stage).to(dist.device)
        semantic = build_semantic_loss(cfg, run_dir).to(dist.device) if stage.semantic_loss else None
        task = TokenizerStageTask(tokenizer, stage, ReconstructionLoss(cfg.loss).to(dist.device), semantic)
        per_rank = stage_cfg.train.batch_size // dist.world_size

        def loader_factory(start_step: int, _seed=stage_cfg.train.seed):
            return build_loader(
                dataset, per_rank, rank=dist.rank, world_size=dist.world_size, seed=_seed,
                num_workers=cfg.data.num_workers, start_step=start_step,
            )

        trainer = Trainer(
            task,
            train=stage_cfg.train,
            optim={"generator": stage_cfg.optim, "discriminator": stage_cfg.disc_optim},
            loader_factory=loader_factory,
            out_dir=stage_train_dir(run_dir, number),
            run_config=cfg,
            dist=dist,
        )
        trainer.fit()
        with trainer.ema_weights():
            if dist.rank == 0:
                tokenizer.save_pretrained(out, card_extra={"stage": f"{number} ({stage.name})"})
        dist.barrier()
        log.info("stage %d (%s) done in %.1f s -> %s", number, stage.name, time.perf_counter() - started, out)
        outputs[number] = out
    return outputs
