"""Tokenizer training stages, as data, and the pipeline that runs them.

The table :data:`STAGES` says, for each of AlignTok's three stages, which parts of the tokenizer train,
whether the semantic preservation loss is on, whether an EMA is kept, and whose output the stage starts
from. Everything else (freezing, optimizer groups, where weights are loaded from) is derived from that
table, so a test can assert it and a reader can see the method at a glance.

The baselines the paper compares with are tables too (:data:`METHOD_STAGES`, chosen by the config's
``method``): the plain VAE and the VA-VAE-style VAE each have a single stage in which their whole
tokenizer trains from scratch with L_rec + KL (+ the VF loss for the VA-VAE), so ``RUN/stage1`` is
their output and the same command, resume logic and ``--stage`` apply. The FLUX-VAE baseline
(``flux-vae``) is a diffusers AutoencoderKL of FLUX.1's VAE shape (f8, 16 channels; section
``flux_vae``) trained the same way as the plain VAE: one stage, L_rec + KL, from scratch.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
from torch import nn

from aligntok.config import (
    RUN_ONLY_KEYS,
    ConfigError,
    DataConfig,
    OptimConfig,
    TrainConfig,
    check_choice,
    config_changes,
    config_to_dict,
    describe_changes,
)
from aligntok.losses.reconstruction import ReconLossConfig, ReconstructionLoss
from aligntok.losses.semantic import SemanticLossConfig, SemanticPreservationLoss
from aligntok.losses.vf import VFLoss, VFLossConfig
from aligntok.models.baselines import (
    KLConfig,
    VAEConfig,
    VAETokenizer,
    diagonal_gaussian_kl,
    sample_posterior,
)
from aligntok.models.diffusers_vae import DiffusersVAETokenizer, FluxVAEConfig
from aligntok.models.tokenizer import (
    AlignTokTokenizer,
    LatentTokenizer,
    TokenizerConfig,
    build_foundation_encoder,
)

log = logging.getLogger(__name__)

PARTS = AlignTokTokenizer.parts  #: AlignTok's tokenizer parts: encoder, adapter, decoder


@dataclasses.dataclass(frozen=True)
class Stage:
    number: int
    name: str
    trains: frozenset[str]  #: tokenizer parts whose weights change
    semantic_loss: bool  #: L_rec + w_sp * L_sp instead of L_rec alone
    keeps_ema: bool  #: EMA of the tokenizer is kept (and exported) in this stage
    starts_from: int | None  #: the stage whose output this one loads; None = pretrained encoder, fresh adapter/decoder
    kl_loss: bool = False  #: the VAE's KL term is on (baselines: samples of the posterior are decoded)
    vf_loss: bool = False  #: VA-VAE's VF loss is on (its latent-to-foundation projection trains too)


STAGES: dict[int, Stage] = {
    1: Stage(1, "latent alignment", frozenset({"adapter", "decoder"}), False, False, None),
    2: Stage(2, "perceptual alignment", frozenset(PARTS), True, True, 1),
    3: Stage(3, "decoder refinement", frozenset({"decoder"}), False, False, 2),
}

#: Every tokenizer method's stage table, selected by the config's ``method``. The baselines train their
#: whole VAE (encoder and decoder, from scratch) in one stage with all their losses on.
METHOD_STAGES: dict[str, dict[int, Stage]] = {
    "aligntok": STAGES,
    "vae": {1: Stage(1, "plain VAE", frozenset(VAETokenizer.parts), False, False, None, kl_loss=True)},
    "vavae": {
        1: Stage(1, "VA-VAE", frozenset(VAETokenizer.parts), False, False, None, kl_loss=True, vf_loss=True)
    },
    "flux-vae": {1: Stage(1, "FLUX-VAE", frozenset(DiffusersVAETokenizer.parts), False, False, None, kl_loss=True)},
}
#: Tokenizers with a Gaussian posterior, which a stage with the KL term can train.
POSTERIOR_TOKENIZERS = (VAETokenizer, DiffusersVAETokenizer)


@dataclasses.dataclass
class StageConfig:
    """Length and optimisation of one stage."""

    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)  #: loop, batch, EMA, checkpoints
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)  #: the tokenizer's optimizer
    disc_optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)  #: the discriminator's optimizer
    init_from_ema: bool = True  #: start from the previous stage's EMA weights when it kept an EMA
    #: Start from the previous stage's discriminator (weights and Adam moments, from its last checkpoint)
    #: instead of a fresh one, as VA-VAE carries its discriminator through its fine-tuning stages. A first
    #: stage always starts a fresh one.
    carry_discriminator: bool = True
    #: Step of this stage at which the GAN terms switch on. null: loss.gan_start counted from the start of
    #: the discriminator's life, i.e. minus the steps of the earlier stages it was carried through (so after
    #: a stage 1 longer than loss.gan_start the GAN is on from step 0, as VA-VAE's fine-tuning has disc_start 1).
    gan_start: int | None = None
    #: Not in the paper (off): the decoder learns from latents plus Gaussian noise of sigma ~ U(0, decoder_noise)
    #: times each channel's batch standard deviation, so that it tolerates a diffusion model's inexact latents
    #: (RAE's noise-augmented decoding, arXiv:2510.11690, in spirit). docs/reproduction measures what it buys.
    decoder_noise: float = 0.0

    def validate(self) -> None:
        if self.gan_start is not None and self.gan_start < 0:
            raise ConfigError(f"gan_start={self.gan_start} must be >= 0 (or null)")
        if self.decoder_noise < 0:
            raise ConfigError(f"decoder_noise={self.decoder_noise} must be >= 0")


@dataclasses.dataclass
class TokenizerTrainConfig:
    """Everything `aligntok train-tokenizer` needs."""

    method: str = "aligntok"  #: aligntok (3 stages) | vae | vavae | flux-vae (baselines, 1 stage): the tokenizer and its stages
    #: AlignTok's tokenizer. The baselines take its latent_channels and decoder (so both match AlignTok's),
    #: and the VA-VAE's VF loss aligns to the foundation encoder it names (encoder, encoder_kind, random_encoder).
    model: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: ReconLossConfig = dataclasses.field(default_factory=ReconLossConfig)  #: L_rec, every stage
    semantic: SemanticLossConfig = dataclasses.field(default_factory=SemanticLossConfig)  #: L_sp, stage 2
    kl: KLConfig = dataclasses.field(default_factory=KLConfig)  #: the baselines' KL term (method vae, vavae, flux-vae)
    #: The FLUX-VAE baseline's AutoencoderKL (method flux-vae; its own shape, not model's decoder and latent)
    flux_vae: FluxVAEConfig = dataclasses.field(default_factory=FluxVAEConfig)
    vf: VFLossConfig = dataclasses.field(default_factory=VFLossConfig)  #: the VF loss (method vavae)
    stage1: StageConfig = dataclasses.field(default_factory=StageConfig)
    #: Stage 2 keeps an EMA with LDM's LitEma warm-up, so a stage shorter than the EMA's lag
    #: (1 / (1 - decay) steps) still exports weights close to those it trained.
    stage2: StageConfig = dataclasses.field(
        default_factory=lambda: StageConfig(train=TrainConfig(ema_decay=0.9999, ema_warmup=True))
    )
    stage3: StageConfig = dataclasses.field(default_factory=StageConfig)

    def stage(self, number: int) -> StageConfig:
        return getattr(self, f"stage{number}")

    @property
    def stages(self) -> dict[int, Stage]:
        """The stage table of this config's method."""
        return METHOD_STAGES[self.method]

    def validate(self) -> None:
        check_choice("method", self.method, tuple(METHOD_STAGES))
        stride = self.flux_vae.stride if self.method == "flux-vae" else 2 ** (len(self.model.decoder.channel_mult) - 1)
        if self.data.resolution % stride:
            raise ConfigError(f"data.resolution={self.data.resolution} is not a multiple of the tokenizer stride {stride}")
        if any(self.stage(n).train.fsdp for n in self.stages):
            # The adaptive GAN weight differentiates w.r.t. the decoder's whole last layer, not a shard.
            raise ConfigError("train.fsdp is not supported for tokenizer stages; they train data-parallel")


def apply_stage(tokenizer: LatentTokenizer, stage: Stage) -> None:
    """Freeze what the stage does not train: no gradient, eval mode (so no dropout / stat updates)."""
    for part in tokenizer.parts:
        module: nn.Module = getattr(tokenizer, part)
        trains = part in stage.trains
        module.requires_grad_(trains)
        module.train(trains)


@dataclasses.dataclass
class _Encoded:
    """What a training step's encoder side produced: the latent to decode, and what the losses need."""

    latent: torch.Tensor
    pre: torch.Tensor | None = None  #: AlignTok: foundation features before the adapter
    mean: torch.Tensor | None = None  #: VAE: posterior mean
    logvar: torch.Tensor | None = None  #: VAE: posterior log-variance


def add_decoder_noise(latent: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """``latent`` (B, C, H, W) plus Gaussian noise of per-sample sigma ~ U(0, max_sigma) times each channel's
    standard deviation over the batch (detached); ``latent`` itself when ``max_sigma`` is 0. Torch's global RNG
    (resumable, as the VAE's posterior samples)."""
    if max_sigma == 0:
        return latent
    std = latent.detach().float().std(dim=(0, 2, 3), keepdim=True).to(latent.dtype)
    sigma = max_sigma * torch.rand(latent.shape[0], 1, 1, 1, device=latent.device, dtype=latent.dtype)
    return latent + sigma * std * torch.randn_like(latent)


class TokenizerStageTask:
    """One stage of tokenizer training as an engine task: generator and discriminator losses.

    The generator loss is L_rec plus what the stage turns on: L_sp (AlignTok stage 2), the KL term and
    the VF loss (baselines). A VAE decodes a sample of its posterior; AlignTok decodes its latent.
    """

    def __init__(
        self,
        tokenizer: LatentTokenizer,
        stage: Stage,
        recon_loss: ReconstructionLoss,
        semantic: SemanticPreservationLoss | None,
        *,
        kl: KLConfig | None = None,
        vf: VFLoss | None = None,
        decoder_noise: float = 0.0,
    ):
        if stage.semantic_loss != (semantic is not None):
            raise ValueError(f"stage {stage.number} needs semantic loss={stage.semantic_loss}")
        if stage.kl_loss != (kl is not None) or stage.vf_loss != (vf is not None):
            raise ValueError(f"stage {stage.number} needs KL loss={stage.kl_loss} and VF loss={stage.vf_loss}")
        if stage.kl_loss and not isinstance(tokenizer, POSTERIOR_TOKENIZERS):
            raise ValueError(f"stage {stage.number} ({stage.name}) trains a VAE, got a {type(tokenizer).__name__}")
        if stage.vf_loss and not isinstance(tokenizer, VAETokenizer):
            raise ValueError(f"stage {stage.number} ({stage.name}) trains a VAE, got a {type(tokenizer).__name__}")
        if semantic is not None and not isinstance(tokenizer, AlignTokTokenizer):
            raise ValueError(f"the semantic loss needs an AlignTok tokenizer, got {type(tokenizer).__name__}")
        self.tokenizer, self.stage, self.recon_loss, self.semantic = tokenizer, stage, recon_loss, semantic
        self.kl, self.vf, self.decoder_noise = kl, vf, decoder_noise
        apply_stage(tokenizer, stage)

    def modules(self) -> dict[str, nn.Module]:
        modules = {"tokenizer": self.tokenizer, "discriminator": self.recon_loss.discriminator}
        if self.vf is not None:
            modules["vf_projection"] = self.vf.projection  # trained, so checkpointed; the frozen encoder is not
        return modules

    def optimizers(self) -> dict[str, list[nn.Parameter]]:
        generator = [p for p in self.tokenizer.parameters() if p.requires_grad]
        if self.vf is not None:
            generator += list(self.vf.projection.parameters())
        return {"generator": generator, "discriminator": list(self.recon_loss.discriminator.parameters())}

    def ema_modules(self) -> list[str]:
        return ["tokenizer"] if self.stage.keeps_ema else []

    def train_mode(self) -> None:
        """Called by the engine instead of module.train(): frozen parts stay in eval mode."""
        apply_stage(self.tokenizer, self.stage)
        self.recon_loss.discriminator.train()
        if self.vf is not None:
            self.vf.projection.train()

    def _encode(self, x: torch.Tensor) -> _Encoded:
        tok, trains = self.tokenizer, self.stage.trains
        if isinstance(tok, VAETokenizer):
            with torch.set_grad_enabled("encoder" in trains):
                mean, logvar = tok.encoder(x)
            return _Encoded(sample_posterior(mean, logvar), mean=mean, logvar=logvar)
        if isinstance(tok, DiffusersVAETokenizer):
            with torch.set_grad_enabled("vae" in trains):
                mean, logvar = tok.posterior(x)
            return _Encoded(sample_posterior(mean, logvar), mean=mean, logvar=logvar)
        with torch.set_grad_enabled("encoder" in trains):
            pre = tok.encoder(x)
        with torch.set_grad_enabled(bool({"encoder", "adapter"} & trains)):
            post = tok.adapter(pre)
        return _Encoded(post, pre=pre)

    def losses(self, batch: dict, step: int) -> dict[str, tuple[torch.Tensor, dict]]:
        x = batch["image"]
        tok = self.tokenizer
        encoded = self._encode(x)
        recon = tok.decode(add_decoder_noise(encoded.latent, self.decoder_noise))
        nll = self.recon_loss.nll_loss(x, recon)  # kept with its graph: the VF weight balances against it
        rec, logs = self.recon_loss.generator_loss(x, recon, step, tok.decoder_last_layer, nll=nll)
        total = rec
        if self.semantic is not None:
            sp, sp_logs = self.semantic(x, encoded.pre, encoded.latent)  # already weighted by w_sp
            total = total + sp
            logs = {**logs, **sp_logs}
        if self.kl is not None and encoded.mean is not None and encoded.logvar is not None:
            kl = diagonal_gaussian_kl(encoded.mean, encoded.logvar).mean()
            # LDM sums the reconstruction loss over pixel values and the KL over latent elements; ours
            # averages over pixel values, so the KL is divided by their number for kl.weight to mean the same.
            kl_term = self.kl.weight * kl / x[0].numel()
            total = total + kl_term
            logs = {**logs, "kl": kl.detach(), "kl_total": kl_term.detach()}
        if self.vf is not None and isinstance(tok, VAETokenizer):
            vf, vf_logs = self.vf(x, encoded.latent, nll[0], tok.encoder.last_layer)
            total = total + vf
            logs = {**logs, **vf_logs}
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


def build_tokenizer(cfg: TokenizerTrainConfig) -> LatentTokenizer:
    """A fresh tokenizer of the config's method: AlignTok's (pretrained encoder) or a baseline VAE."""
    if cfg.method == "aligntok":
        return AlignTokTokenizer.from_config(cfg.model)
    if cfg.method == "flux-vae":
        return DiffusersVAETokenizer.from_scratch(cfg.flux_vae)
    return VAETokenizer.from_config(VAEConfig.like(cfg.model, trained_with=cfg.method))


def build_stage_tokenizer(cfg: TokenizerTrainConfig, run_dir: Path, stage: Stage,
                          start_from: Path | None = None) -> LatentTokenizer:
    """The tokenizer a stage starts from: a fresh one for a first stage, else the previous stage's output,
    or the tokenizer saved in ``start_from`` (e.g. stage 3 run again on other images, on top of a finished one)."""
    if stage.starts_from is None:
        if start_from is not None:
            raise ConfigError(f"stage {stage.number} ({stage.name}) starts from scratch, not from {start_from}")
        torch.manual_seed(cfg.stage(stage.number).train.seed)
        return build_tokenizer(cfg)
    if start_from is not None:
        return AlignTokTokenizer.from_pretrained(start_from)
    previous = cfg.stages[stage.starts_from]
    source = _require_stage_output(run_dir, previous.number, stage.number)
    tokenizer = AlignTokTokenizer.from_pretrained(source)
    if previous.keeps_ema and not cfg.stage(stage.number).init_from_ema:
        # The exported directory holds the EMA weights; the raw ones live in the last checkpoint.
        from aligntok.training.checkpoint import load_module_weights

        load_module_weights(stage_train_dir(run_dir, previous.number), "tokenizer", tokenizer)
    return tokenizer


def carried_discriminator_checkpoint(cfg: TokenizerTrainConfig, run_dir: Path, stage: Stage) -> Path | None:
    """The previous stage's last complete checkpoint, whose discriminator this stage continues; None for a
    first stage, with ``carry_discriminator: false``, or when that stage left no checkpoint (logged)."""
    from aligntok.training.checkpoint import latest_checkpoint

    if stage.starts_from is None or not cfg.stage(stage.number).carry_discriminator:
        return None
    found = latest_checkpoint(stage_train_dir(run_dir, stage.starts_from))
    if found is None:
        log.warning(
            "stage %d: stage %d left no checkpoint under %s, so its discriminator cannot be carried over; "
            "starting a fresh one (set stage%d.carry_discriminator=false to say so)",
            stage.number, stage.starts_from, stage_train_dir(run_dir, stage.starts_from), stage.number,
        )
    return found


def stage_gan_start(cfg: TokenizerTrainConfig, stage: Stage, carried: bool) -> int:
    """The step of ``stage`` at which its GAN terms switch on (see ``StageConfig.gan_start``)."""
    own = cfg.stage(stage.number).gan_start
    if own is not None:
        return own
    trained_before, current = 0, stage
    while carried and current.starts_from is not None:
        previous = cfg.stages[current.starts_from]
        trained_before += cfg.stage(previous.number).train.steps
        if previous.starts_from is None or not cfg.stage(previous.number).carry_discriminator:
            break
        current = previous
    return max(0, cfg.loss.gan_start - trained_before)


def build_recon_loss(cfg: TokenizerTrainConfig, run_dir: Path, stage: Stage,
                     carry: bool = True) -> tuple[ReconstructionLoss, Path | None]:
    """The stage's L_rec with its discriminator: carried over from the previous stage's last checkpoint
    (returned, so its optimizer state can follow) or fresh (always when ``carry`` is False), and the
    stage's own ``gan_start``."""
    from aligntok.training.checkpoint import load_tensors, require_file

    carried = carried_discriminator_checkpoint(cfg, run_dir, stage) if carry else None
    loss_cfg = dataclasses.replace(cfg.loss, gan_start=stage_gan_start(cfg, stage, carried is not None))
    loss = ReconstructionLoss(loss_cfg)
    if carried is not None:
        file = require_file(carried / "model_discriminator.safetensors", "weights of module 'discriminator'")
        loss.discriminator.load_state_dict(load_tensors(file))
    return loss, carried


def build_semantic_loss(cfg: TokenizerTrainConfig, run_dir: Path) -> SemanticPreservationLoss:
    """The frozen stage-1 encoder+adapter, rebuilt from stage 1's output (never from a checkpoint)."""
    teacher = AlignTokTokenizer.from_pretrained(_require_stage_output(run_dir, 1, 2))
    return SemanticPreservationLoss(cfg.semantic, encoder=teacher.encoder, adapter=teacher.adapter)


def build_vf_loss(cfg: TokenizerTrainConfig, stage: Stage) -> VFLoss:
    """VA-VAE's VF loss: the frozen foundation encoder ``cfg.model`` names, and a fresh projection.

    The encoder is built from the stage's seed exactly as AlignTok's first stage builds its own, so a
    random encoder (tests, tiny configs) is the very one AlignTok starts from. It is rebuilt on resume,
    never read from a checkpoint; the projection's trained weights are.
    """
    torch.manual_seed(cfg.stage(stage.number).train.seed)
    encoder = build_foundation_encoder(cfg.model)
    return VFLoss(cfg.vf, foundation_encoder=encoder, latent_channels=cfg.model.latent_channels)


def check_finished_stages(previous: TokenizerTrainConfig, cfg: TokenizerTrainConfig, run_dir: str | Path) -> None:
    """Raise a one-line ConfigError when a stage already finished in ``run_dir`` (so it would be skipped) was made
    with other settings than ``cfg`` gives it: its own stage's and the shared ones (model, data, losses), not a
    later stage's, nor :data:`aligntok.config.RUN_ONLY_KEYS`. ``previous``: the config the run recorded."""
    changes = config_changes(config_to_dict(previous), config_to_dict(cfg), ignore=RUN_ONLY_KEYS)
    for number in cfg.stages:
        out = stage_output_dir(Path(run_dir), number)
        if not (out / "config.json").is_file():
            continue
        later = tuple(f"stage{m}." for m in cfg.stages if m > number)
        relevant = {k: v for k, v in changes.items() if not k.startswith(later)}
        if relevant:
            redo = [n for n in cfg.stages if n >= number]
            folders = ", ".join(str(p) for n in redo for p in (stage_output_dir(Path(run_dir), n), stage_train_dir(Path(run_dir), n)))
            raise ConfigError(
                f"stage {number} is finished in {out} with other settings ({describe_changes(relevant)}); use a new "
                f"--out, or delete {folders} to train from stage {number} again"
            )


def _stages_to_run(cfg: TokenizerTrainConfig, requested: tuple[int, ...] | None) -> tuple[int, ...]:
    table = cfg.stages
    if requested is None:
        return tuple(table)
    absent = [n for n in requested if n not in table]
    if absent:
        raise ConfigError(
            f"method {cfg.method!r} has stage(s) {', '.join(map(str, table))} only; there is no stage "
            f"{', '.join(map(str, absent))}"
        )
    return tuple(requested)


def train_tokenizer(
    cfg: TokenizerTrainConfig, run_dir: str | Path, stages: tuple[int, ...] | None = None,
    *, start_from: str | Path | None = None,
) -> dict[int, Path]:
    """Run the given stages of the config's method in order (None: all of them); each leaves a loadable
    tokenizer in ``run_dir/stageN``. ``start_from``: a saved tokenizer the first of them starts from instead
    of ``run_dir``'s previous stage (its discriminator is then fresh); a first stage cannot take one.

    Naming a stage the method lacks (a baseline has only stage 1) is an error. A stage whose output already exists is skipped, and an interrupted stage
    resumes from its latest checkpoint, so re-running the same command continues where it stopped.
    """
    from aligntok.data import build_dataset, build_loader
    from aligntok.training.distributed import init_distributed
    from aligntok.training.trainer import Trainer

    run_dir = Path(run_dir)
    numbers = _stages_to_run(cfg, stages)
    dist = init_distributed()
    dataset = build_dataset(
        cfg.data.train, cfg.data.resolution, hflip=cfg.data.hflip, seed=cfg.stage1.train.seed,
        builtin_size=cfg.data.builtin_size,
    )
    outputs: dict[int, Path] = {}
    for number in numbers:
        stage, stage_cfg = cfg.stages[number], cfg.stage(number)
        out = stage_output_dir(run_dir, number)
        if (out / "config.json").is_file():
            log.info("stage %d (%s): output %s exists, skipping", number, stage.name, out)
            outputs[number] = out
            continue
        started = time.perf_counter()
        start = Path(start_from) if start_from is not None and number == numbers[0] else None
        tokenizer = build_stage_tokenizer(cfg, run_dir, stage, start).to(dist.device)
        semantic = build_semantic_loss(cfg, run_dir).to(dist.device) if stage.semantic_loss else None
        vf = build_vf_loss(cfg, stage).to(dist.device) if stage.vf_loss else None
        recon_loss, carried = build_recon_loss(cfg, run_dir, stage, carry=start is None)
        task = TokenizerStageTask(
            tokenizer, stage, recon_loss.to(dist.device), semantic, kl=cfg.kl if stage.kl_loss else None, vf=vf,
            decoder_noise=stage_cfg.decoder_noise,
        )
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
        if carried is not None:
            trainer.warm_start_optimizer("discriminator", carried)
            log.info("stage %d: discriminator carried over from %s (GAN from step %d)", number, carried,
                     recon_loss.config.gan_start)
        trainer.fit()
        card = {"method": cfg.method, "stage": f"{number} ({stage.name})"}
        if stage.vf_loss:
            card["VF loss foundation encoder"] = cfg.model.encoder
        with trainer.ema_weights():
            if dist.rank == 0:
                tokenizer.save_pretrained(out, card_extra=card)
        dist.barrier()
        log.info("stage %d (%s) done in %.1f s -> %s", number, stage.name, time.perf_counter() - started, out)
        outputs[number] = out
    return outputs
