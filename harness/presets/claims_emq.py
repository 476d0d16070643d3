"""EMQ's claims (NeurIPS 2025): the coreset at 80 % pruning against full-data multi-bit training, the sampling
temperature, BN adaptation for untrained bit-widths (``claims-emq-digits``), and its ablations: the separate
1-bit BN, bit-wise against batch-wise scoring, bias correction and BN adaptation (``claims-emq-ablations-digits``).
The ``-cifar10`` variants are the paper-sized runs for a GPU."""

from harness.claims import Claim
from harness.config import Schedule
from harness.presets import Preset

EMQ_PAPER = "EMQ (Kim et al., NeurIPS 2025)"
# digits: 1,437 training images; at batch 32 a 20 % coreset is 9 steps per epoch, and with the default scoring
# length (5 % of the epochs, at least 3) 60 epochs keep scoring at the paper's quarter of the coreset passes.
DIGITS = Schedule(epochs=60, batch_size=32, lr=0.05, lr_schedule="cosine", weight_decay=5e-4)
CIFAR = Schedule(epochs=200, batch_size=128, optimizer="adam", lr=1e-3, weight_decay=0.0, lr_schedule="step",
                 milestones=(100, 150, 180), gamma=0.1, augment=True)

MAIN_METHODS = ("emq", "emq:prune=0", "emq:tau=0.1", "emq:tau=1.0")
MAIN_CLAIMS = (
    Claim("emq-coreset-within-1pt-at-3.5x-less-time", f"{EMQ_PAPER}, abstract and Table 2 (80 % pruning)",
          kind="all_of", parts=(
              Claim(kind="within", a="emq", b="emq:prune=0", margin=1.0),
              Claim(kind="cost_ratio", a="emq:prune=0", b="emq", ratio=3.5, cost="device_hours"),
          )),
    Claim("emq-tau-0.5-beats-0.1-and-1.0", f"{EMQ_PAPER}, Table 12", kind="better", a="emq", b="emq:tau=0.1",
          c="emq:tau=1.0"),
    Claim("emq-untrained-bits-between-neighbours", f"{EMQ_PAPER}, BN adaptation for untrained bit-widths",
          kind="all_of", parts=(
              Claim(kind="between", a="emq", bits=3, b_bits=2, c_bits=4),
              Claim(kind="between", a="emq", bits=5, b_bits=4, c_bits=8),
              Claim(kind="between", a="emq", bits=6, b_bits=4, c_bits=8),
          )),
)

ABLATION_METHODS = ("emq", "emq:share_binary_bn=true", "emq:prune=0.9", "emq:prune=0.9:scoring=batchwise",
                    "emq:bias_correction=off", "emq:bn_adapt_batches=0")
ABLATION_CLAIMS = (
    Claim("emq-shared-1bit-bn-collapses-1bit", f"{EMQ_PAPER}, Table 10 (1 bit: 46 vs 92 % with its own BN)",
          kind="better", a="emq", b="emq:share_binary_bn=true", bits=1, margin=10.0),
    Claim("emq-bitwise-beats-batchwise-scoring", f"{EMQ_PAPER}, Table 7 (80-90 % pruning)", kind="better",
          a="emq:prune=0.9", b="emq:prune=0.9:scoring=batchwise"),
    Claim("emq-bias-correction-helps", f"{EMQ_PAPER}, Table 6", kind="better", a="emq",
          b="emq:bias_correction=off"),
    Claim("emq-bn-adaptation-helps", f"{EMQ_PAPER}, Table 6", kind="better", a="emq", b="emq:bn_adapt_batches=0"),
)


def emq_presets(suffix: str, dataset: str, model: str, width: float, schedule: Schedule, size: str,
                data_needs: str) -> tuple[Preset, Preset]:
    notes = ("Every method on the harness topology (no fp_shortcut), so the claims compare EMQ's own choices.",
             "Scoring runs 5 % of the schedule's epochs (at least 3): the paper's 10 of 200.")
    main = Preset(name=f"claims-emq-{suffix}", title=f"EMQ claims: coreset vs full data, tau, untrained bit-widths "
                  f"({dataset}, {model})", dataset=dataset, model=model, width=width, bits=(2, 4, 8),
                  eval_bits=(2, 3, 4, 5, 6, 8), methods=MAIN_METHODS, schedule=schedule, notes=notes,
                  data_needs=data_needs, speedup_baseline="emq:prune=0", claims=MAIN_CLAIMS, seeds=(0, 1, 2),
                  size=size)
    ablations = Preset(name=f"claims-emq-ablations-{suffix}", title=f"EMQ ablation claims: 1-bit BN, scoring, "
                       f"bias correction, BN adaptation ({dataset}, {model})", dataset=dataset, model=model,
                       width=width, bits=(1, 2, 4, 8), methods=ABLATION_METHODS, schedule=schedule, notes=notes,
                       data_needs=data_needs, claims=ABLATION_CLAIMS, seeds=(0, 1, 2), size=size)
    return main, ablations


PRESETS = (
    *emq_presets("digits", "digits", "resnet20", 0.5, DIGITS, "cpu", "built in (scikit-learn's digits)"),
    *emq_presets("cifar10", "cifar10", "preact_resnet20", 5.0, CIFAR, "full",
                 "CIFAR-10 python batches under --data-root (cifar-10-batches-py/)"),
)
