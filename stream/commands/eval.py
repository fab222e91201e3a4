"""``tgastream eval DATA.csv``: offline, time-ordered evaluation of TGA against the baselines."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tgastream.core.settings import Settings

EPOCHS = 2
MAX_TRAIN_SAMPLES = 32_000
"""The default budget of every neural model: at most 2 epochs of 32k samples, early-stopped. Sized so
that ``tgastream eval taobao-users-60k.csv --seeds 3`` fits 45 minutes (one seed 15) on the 2-core
machine with one torch thread (docs/model/evaluation.md has the measured wall time).
The old default, 4 epochs over all 71,682 training samples, is ~287k samples per model and seed:
at the ~730-930 samples/s TGA and SASRec train at on one thread, over 15 minutes of training alone
per seed for the three sequence models (an estimate from those measured speeds, not a run)."""

HELP = ("offline evaluation: time-ordered 80/20 split, TGA vs SASRec, DIN, most-popular, repeat-recent and "
        "co-visitation, seed means with user-bootstrap intervals")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", type=Path, help="behavior log (Taobao CSV, JSON lines or RetailRocket events.csv)")
    p.add_argument("--models", default="tga,sasrec,sasrec_copy,din,pop,repeat,covisit,repeat_covisit",
                   help="comma-separated models (also: covisit, repeat_covisit baselines; tga_nocopy, sasrec_copy ablations) "
                        "(default: %(default)s)")
    p.add_argument("--seeds", type=int, default=0,
                   help="train every neural model on seeds SEED+1 .. SEED+N and report mean ± sd (default: 0 = one run on SEED)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="user-bootstrap resamples for the 95%% intervals, 0 = none (default: %(default)s)")
    p.add_argument("--on-validation", action="store_true",
                   help="score the validation share instead of the test period (to choose settings; fixed epochs)")
    p.add_argument("--conversion-weight", type=float, default=None,
                   help="TGA/SASRec conversion loss weight (default: the model config's)")
    p.add_argument("--conversion-grad", type=float, default=None,
                   help="share of the conversion loss's gradient reaching the shared encoder, 0..1 (default: the model config's)")
    p.add_argument("--conversion-raw", action=argparse.BooleanOptionalAction, default=True,
                   help="TGA/SASRec conversion head also attends over raw embeddings of a table of its own, DIN's input "
                        "(default: on)")
    p.add_argument("--conversion-features", action=argparse.BooleanOptionalAction, default=None,
                   help="conversion head also reads behavior-typed counts of the candidate in the context and its "
                        "recency (default: the model config's)")
    p.add_argument("--transition-prior", type=int, default=32,
                   help="co-visitation candidates per next-event sample fed to TGA as a learned logit term, "
                        "0 = none (default: %(default)s)")
    p.add_argument("--repeat-prior", action=argparse.BooleanOptionalAction, default=None,
                   help="pointer models start as repeat-recent (learned repeat prior, model/retrieval_head.py; "
                        "default: on)")
    p.add_argument("--conversion-prior", action=argparse.BooleanOptionalAction, default=None,
                   help="TGA's conversion head starts as repeat-interest (model/conversion_head.py; default: off "
                        "offline, on in the online trainer)")
    p.add_argument("--pointer-bound", type=float, default=None,
                   help="with the repeat prior: bound of the learned pointer term, 0 = unbounded (model/retrieval_head.py; "
                        "default: the model config's, 8)")
    p.add_argument("--patience", type=int, default=2,
                   help="epochs without a better validation score before stopping (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = torch's default (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=EPOCHS,
                   help="max training epochs, early-stopped on validation (default: %(default)s)")
    p.add_argument("--conversion-finetune", type=int, default=1,
                   help="epochs of a conversion stage after training: the conversion head alone on the frozen encoder, "
                        "early-stopped on validation conversion logloss, 0 = none (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="training batch (default: 256)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default: 2e-3)")
    p.add_argument("--dim", type=int, default=None, help="embedding width (default: settings dim)")
    p.add_argument("--layers", type=int, default=None, help="encoder layers (default: settings layers)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default: settings heads)")
    p.add_argument("--ffn-mult", type=int, default=1, help="feed-forward width / dim (default: 1, SASRec's)")
    p.add_argument("--dropout", type=float, default=0.2, help="dropout (default: 0.2)")
    p.add_argument("--split", type=float, default=0.8, help="share of events (by time) for training (default: 0.8)")
    p.add_argument("--valid-share", type=float, default=0.1,
                   help="last share of the training period held out for early stopping (default: 0.1)")
    p.add_argument("--sample-len", type=int, default=None, help="context nodes per sample (default: settings sample_len)")
    p.add_argument("--max-train-samples", type=int, default=MAX_TRAIN_SAMPLES,
                   help="cap on training samples per epoch, 0 = all (default: %(default)s)")
    p.add_argument("--max-test-cases", type=int, default=0, help="cap on test (and validation) cases of each kind (default: 0 = all)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda (default: settings device)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: settings seed)")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--png", type=Path, default=None, help="write the figure here (default: next to --json, else eval.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from tgastream.model.config import TrainConfig
    from tgastream.model.evaluation import EvalConfig, format_markdown, format_table, plot, run as run_eval
    from tgastream.core.errors import CommandError
    from tgastream.core.events import load_events

    if not args.data.exists():
        raise CommandError(f"no such file: {args.data}")
    if args.threads < 0:
        raise CommandError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    events = load_events(args.data)
    if len(events) < 10:
        raise CommandError(f"{args.data} has {len(events)} valid events; need at least 10")
    try:
        cfg = EvalConfig(
            split=args.split, valid_share=args.valid_share, max_len=settings.max_len,
            sample_len=args.sample_len or settings.sample_len, window_s=settings.conversion_window_s,
            models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
            dim=args.dim or settings.dim, layers=args.layers or settings.layers, heads=args.heads or settings.heads,
            ffn_mult=args.ffn_mult, dropout=args.dropout,
            train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              seed=settings.seed if args.seed is None else args.seed,
                              max_train_samples=args.max_train_samples, weight_decay=args.weight_decay,
                              conversion_finetune_epochs=args.conversion_finetune, patience=args.patience),
            device=args.device or settings.device, max_test_cases=args.max_test_cases,
            seeds=args.seeds, bootstrap=args.bootstrap, on_validation=args.on_validation,
            transition_prior=args.transition_prior, conversion_raw=args.conversion_raw,
            model_overrides=tuple((key, value) for key, value in (("conversion_weight", args.conversion_weight),
                                                                  ("conversion_grad", args.conversion_grad),
                                                                  ("conversion_features", args.conversion_features),
                                                                  ("repeat_prior", args.repeat_prior),
                                                                  ("conversion_prior", args.conversion_prior),
                                                                  ("pointer_bound", args.pointer_bound))
                                  if value is not None),
        ).validate()
        if cfg.dim % cfg.heads:
            raise ValueError(f"dim ({cfg.dim}) must be divisible by heads ({cfg.heads})")
        result = run_eval(events, cfg, progress=not args.quiet)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    result["data"]["file"] = str(args.data)
    print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        args.json.with_suffix(".md").write_text(format_markdown(result))
        print(f"wrote {args.json} and {args.json.with_suffix('.md')}")
    png = args.png or (args.json.with_suffix(".png") if args.json else Path("eval.png"))
    plot(result, png)
    print(f"wrote {png}  (total {result['seconds']:.0f}s)")
    return 0
