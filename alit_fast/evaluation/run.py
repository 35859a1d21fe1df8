"""``evaluate``: reconstruction metrics of an ALIT model at every token count and for adaptive
criteria, in one batched pass with streaming sums.

Per batch: one rollout gives every iteration's decoder logits; each iteration needed is decoded to
pixels once; every metric of every image at every such iteration is computed on the device; fixed
rows add their values to float64 sums, and each criterion row picks each image's own iteration
from the same values (and the same Inception features), so an adaptive row costs no extra
forward. Nothing is written to disk and what is kept does not grow with the data set (bar one
token count and one PNG size per image for the adaptive rows' Spearman correlation).

The default is the official ``evaluate_rfid.py``'s procedure: its center crop (done by the data
source, see data.py), fp32, stochastic halting at every iteration (the official evaluation halts
as training does; seeded here), and the uint8 truncation its PNG round trip applies to both the
ground truth and the reconstructions. ``halting="off"`` gives deterministic numbers.

Under ``torch.distributed`` each rank evaluates its shard (whole batches of the one-process
order, batch k on rank k % world, so each image's values are those of one process bit for bit)
and the sums are all-reduced once at the end: the report equals one process's to float64
round-off of the sums' order (~1e-15 relative).
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..files import write_atomic
from ..inference import Criterion, StepView, criterion_name, parse_criterion, pixels_from_logits
from ..inference.encode import CountChoice, bound_decides, check_criterion_fits, check_fallback, out_of_reach
from .data import ImageFiles, png_bytes_per_pixel, to_unit
from .metrics import FeatureStats, MetricSums, fid_from_stats, l1_l2, psnr_from_mse, quantize_uint8, spearman, ssim

METRICS = ("l1", "l2", "psnr", "ssim", "lpips", "fid")
PER_IMAGE = ("l1", "l2", "psnr", "ssim", "lpips")  # averaged over images; fid is per set
FID_METHODS = ("eigh", "sqrtm")


@dataclass
class EvalRow:
    """One line of the report: a fixed token count or an adaptive criterion."""

    name: str  # "tokens:32" or the criterion, e.g. "code-acc:0.6"
    kind: str  # "fixed" or "adaptive"
    tokens: float  # the count, or the mean count per image
    metrics: dict[str, float]
    images: int
    psnr_exact_images: int = 0  # images reconstructed exactly (infinite PSNR, left out of its mean)
    histogram: dict[int, int] | None = None  # adaptive rows: images per token count
    spearman_png: float | None = None  # adaptive rows: Spearman(token count, PNG bytes per pixel)

    def as_dict(self) -> dict:
        out = {"name": self.name, "kind": self.kind, "tokens": self.tokens, "images": self.images}
        out.update({k: _json_number(v) for k, v in self.metrics.items()})
        if "psnr" in self.metrics:
            out["psnr_exact_images"] = self.psnr_exact_images
        if self.histogram is not None:
            out["histogram"] = {str(k): v for k, v in self.histogram.items()}
            out["spearman_tokens_png_size"] = _json_number(self.spearman_png)
        return out


@dataclass
class EvalReport:
    rows: list[EvalRow]
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    images: int = 0

    def row(self, name: str) -> EvalRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def as_dict(self) -> dict:
        rows = []
        for r in self.rows:
            d = r.as_dict()
            d["seconds"] = round(self.seconds, 3)  # one pass makes every row
            rows.append(d)
        return {"settings": self.settings, "images": self.images, "seconds": self.seconds,
                "images_per_second": self.images / self.seconds if self.seconds > 0 else None, "rows": rows}


def _json_number(v: float | None):
    """JSON has no inf or NaN: they are written as null (the report says why next to them)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return None
    return v


# ---------------------------------------------------------------------- argument checks
def parse_tokens(spec: "str | int | Sequence[int] | None", tokens_per_iter: int, max_tokens: int) -> list[int]:
    """The fixed token counts to report: "all", "32,64", an int or a list. Each must be a
    multiple of the tokens per iteration, at most max_tokens."""
    if spec is None or spec == "all":
        return list(range(tokens_per_iter, max_tokens + 1, tokens_per_iter))
    if spec == "none" or (not isinstance(spec, str) and not isinstance(spec, int) and len(spec) == 0):
        return []
    if isinstance(spec, str):
        try:
            counts = [int(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--tokens {spec!r}: give 'all' or token counts separated by commas, e.g. 32,64") from None
    elif isinstance(spec, int):
        counts = [spec]
    else:
        counts = [int(s) for s in spec]
    bad = [n for n in counts if n < tokens_per_iter or n > max_tokens or n % tokens_per_iter]
    if bad:
        raise ValueError(f"token counts {bad}: this model gives {tokens_per_iter}, {2 * tokens_per_iter}, ..., "
                         f"{max_tokens} tokens (multiples of {tokens_per_iter})")
    return sorted(set(counts))


def parse_metrics(spec: "str | Sequence[str]") -> tuple[str, ...]:
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [n for n in names if n not in METRICS]
    if bad or not names:
        raise ValueError(f"unknown metric(s) {bad or names}; choose from {','.join(METRICS)}")
    return tuple(n for n in METRICS if n in names)


# ---------------------------------------------------------------------- data sources
def _unsized(data) -> bool:
    """Data whose items cannot be skipped to resume: an iterable of batches."""
    return not (isinstance(data, (str, torch.Tensor)) or hasattr(data, "__fspath__")
                or (isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__")))


def _batches(data, batch_size: int, rank: int, world: int, num_workers: int, size: int, crop: str, start: int = 0):
    """(uint8 or float batch [b, 3, S, S], number of items) pairs of this rank's shard from its
    item ``start`` on (a resumed pass), and the shard's length when known."""
    if isinstance(data, str) or hasattr(data, "__fspath__"):
        folder = data
        data = ImageFiles(folder, size, crop)
        if len(data) == 0:
            raise ValueError(f"no image files found in {folder}")
    if isinstance(data, torch.Tensor):
        if data.dim() == 3:
            data = data[None]
        indices = _shard(data.shape[0], batch_size, rank, world)[start:]
        return ((data[indices[i : i + batch_size]]) for i in range(0, len(indices), batch_size)), len(indices)
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        indices = _shard(len(data), batch_size, rank, world)[start:]
        subset = torch.utils.data.Subset(data, indices)
        loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=num_workers,
                                             collate_fn=_stack, shuffle=False)
        return iter(loader), len(indices)
    if isinstance(data, Iterable):  # a loader or any iterable of batches; the caller shards it
        return (_as_batch(b) for b in data), None
    raise TypeError(f"evaluate: data must be images [N, 3, H, W], a folder, a Dataset or an iterable of batches, "
                    f"got {type(data).__name__}")


def _shard(n: int, batch_size: int, rank: int, world: int) -> list[int]:
    """This rank's items: whole batches of the one-process order, batch k going to rank k % world.
    Every image then runs in the same batch as in one process (so its values are the same to the
    bit); only the order in which the ranks' sums are added differs."""
    batches = range(rank, -(-n // batch_size), world)
    return [i for k in batches for i in range(k * batch_size, min((k + 1) * batch_size, n))]


def _stack(items: list) -> torch.Tensor:
    return torch.stack([_as_batch(i) if not isinstance(i, torch.Tensor) else i for i in items])


def _as_batch(item) -> torch.Tensor:
    if isinstance(item, dict):
        item = item["image"]
    elif isinstance(item, (tuple, list)):
        item = item[0]  # (images, labels) as torchvision's ImageFolder gives them
    if not isinstance(item, torch.Tensor):
        raise TypeError(f"evaluate: a batch must be a tensor (or a dict with 'image'), got {type(item).__name__}")
    return item if item.dim() == 4 else item[None]


# ---------------------------------------------------------------------- progress of a long pass
def _sum_tensors(p: "_Pass") -> tuple[dict[str, torch.Tensor], dict[str, FeatureStats]]:
    """Every accumulator of the pass, by name, as tensors (and the kept FID rows)."""
    out = {f"fixed.{t}": m.sums for t, m in p.fixed.items()}
    stats = {f"fixed_feats.{t}": f for t, f in p.fixed_feats.items()}
    if p.gt_feats is not None:
        stats["gt_feats"] = p.gt_feats
    for i, a in enumerate(p.adaptive):
        out[f"adaptive.{i}.sums"], out[f"adaptive.{i}.histogram"] = a.sums.sums, a.histogram
        if a.features is not None:
            stats[f"adaptive.{i}.features"] = a.features
    for name, f in stats.items():
        out.update({f"{name}.count": f.count, f"{name}.total": f.total, f"{name}.gram": f.gram})
    return out, stats


class ProgressError(ValueError):
    """A saved progress file that cannot be continued from (another evaluation's, or damaged)."""


def _save_progress(path, identity: str, p: "_Pass", generator, offset: int, seconds: float) -> None:
    tensors, stats = _sum_tensors(p)
    state = {
        "identity": identity, "offset": offset, "seconds": seconds,
        "tensors": {k: v.cpu() for k, v in tensors.items()},
        "rows": {k: None if f.rows is None else [r.cpu() for r in f.rows] for k, f in stats.items()},
        "kept": {k: f._kept for k, f in stats.items()},
        "counts": [[c.cpu() for c in a.counts] for a in p.adaptive],
        "png": [list(a.png) for a in p.adaptive],
        "generator": generator.get_state() if generator is not None else None,
        # a VAE's posterior draws without a generator come from torch's global one
        "global_rng": torch.get_rng_state(),
    }
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def _restore_progress(path, identity: str, p: "_Pass", generator, device) -> dict:
    """The saved sums put back into the pass (in place); where to start."""
    if path is None or not os.path.exists(path):
        return {"offset": 0, "seconds": 0.0}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["identity"] != identity:
            raise ProgressError(f"{path} holds the progress of another evaluation (other model weights, images or "
                             "options); remove it, or evaluate into another folder")
        tensors, stats = _sum_tensors(p)
        for name, tensor in tensors.items():
            tensor.copy_(state["tensors"][name])
        for name, f in stats.items():
            f.rows = None if state["rows"][name] is None else [r.to(device) for r in state["rows"][name]]
            f._kept = state["kept"][name]
        for a, counts, png in zip(p.adaptive, state["counts"], state["png"]):
            a.counts, a.png = [c.to(device) for c in counts], list(png)
        if generator is not None:
            generator.set_state(state["generator"])
        torch.set_rng_state(state["global_rng"])
        return {"offset": int(state["offset"]), "seconds": float(state["seconds"])}
    except (ProgressError, OSError, torch.cuda.OutOfMemoryError):
        raise  # another identity, or not the file's fault (a disk, a permission, memory): as they are
    except Exception as exc:  # damaged, or of another metric set: start over rather than guess
        raise ProgressError(f"{path} cannot be resumed from ({type(exc).__name__}: {exc}); remove it to start "
                         "the evaluation over") from exc


# ---------------------------------------------------------------------- the pass
@dataclass
class _Criterion:
    name: str
    criterion: Criterion
    sums: MetricSums
    features: FeatureStats | None
    histogram: torch.Tensor  # float64 [iterations]
    counts: list[torch.Tensor] = field(default_factory=list)  # per-batch chosen iteration ids (device)
    png: list[float] = field(default_factory=list)


@dataclass
class _Pass:
    """What one evaluation pass computes and the sums it keeps (all on the device)."""

    model: object
    per_image: tuple[str, ...]  # the per-image metrics asked for
    fixed_iters: list[int]  # 0-based iterations of the fixed rows
    needed: list[int]  # the iterations to decode: the fixed rows', or all when a criterion may pick any
    fixed: dict[int, MetricSums]
    fixed_feats: dict[int, FeatureStats]  # with FID only
    gt_feats: FeatureStats | None
    adaptive: list[_Criterion]
    inception: object = None
    lpips_net: object = None

    @property
    def use_fid(self) -> bool:
        return self.gt_feats is not None


def check_arguments(model, tokens, criteria, metrics, fallback, halting, fid_method, batch_size):
    """The metric names, fixed counts, criteria and their names; a ValueError for anything wrong."""
    cfg = model.config
    metric_names = parse_metrics(metrics)
    counts = parse_tokens(tokens, cfg.tokens_per_iter, cfg.max_tokens)
    crits = [parse_criterion(c) for c in criteria]
    for c in crits:
        check_fallback(c, fallback)
        check_criterion_fits(model, c)
    if not counts and not crits:
        raise ValueError("nothing to evaluate: give token counts or a criterion")
    model.check_halting(halting)
    if fid_method not in FID_METHODS:
        raise ValueError(f"unknown fid_method {fid_method!r}; expected one of {FID_METHODS}")
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    names = [criterion_name(c) for c in crits]
    if len(set(names)) != len(names):
        raise ValueError(f"a criterion is given twice: {names}")
    return metric_names, counts, crits, names


def _new_pass(model, metric_names, counts, crits, names, device) -> _Pass:
    T, iters, dim = model.config.tokens_per_iter, model.config.iterations, 2048
    use_fid = "fid" in metric_names
    per_image = tuple(m for m in metric_names if m in PER_IMAGE)
    fixed_iters = [n // T - 1 for n in counts]
    adaptive = [
        _Criterion(n, c, MetricSums(per_image, device), FeatureStats(dim, device) if use_fid else None,
                   torch.zeros(iters, dtype=torch.float64, device=device))
        for n, c in zip(names, crits)
    ]
    return _Pass(
        model=model, per_image=per_image, fixed_iters=fixed_iters,
        needed=list(range(iters)) if crits else sorted(set(fixed_iters)),
        fixed={t: MetricSums(per_image, device) for t in fixed_iters},
        fixed_feats={t: FeatureStats(dim, device) for t in fixed_iters} if use_fid else {},
        gt_feats=FeatureStats(dim, device) if use_fid else None, adaptive=adaptive,
    )


def _load_networks(p: _Pass, metric_names, fid_model, lpips_model, fid_weights, lpips_vgg, lpips_heads, device) -> None:
    """Inception (FID) and LPIPS, given or loaded; first, so a missing file fails before any image is read."""
    if "fid" in metric_names:
        p.inception = (fid_model if fid_model is not None else _load_inception(fid_weights, device)).to(device).eval()
    if "lpips" in metric_names:
        net = lpips_model if lpips_model is not None else _load_lpips(lpips_vgg, lpips_heads, device)
        p.lpips_net = net.to(device).eval()


def _halting_generator(halting: str, seed: int, rank: int, device: torch.device) -> torch.Generator | None:
    if halting not in ("stochastic", "official"):
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed) + rank)  # each rank its own stream (one process: the seed itself)
    return generator


def _check_batch(x: torch.Tensor, size: int) -> None:
    if x.dim() != 4 or x.shape[1:] != (3, size, size):
        raise ValueError(f"evaluate: images must be [B, 3, {size}, {size}] (the model's size; "
                         f"read files with the official center crop), got {list(x.shape)}")


def _add_batch(p: _Pass, x: torch.Tensor, offset: int, quantize: bool, halting: str, generator, fallback: str) -> None:
    """One batch: a rollout, each needed iteration decoded and measured once, every row's sums."""
    model = p.model
    gt = quantize_uint8(x) if quantize else x.float()
    records = model.rollout(x, iterations=max(p.needed) + 1, halting=halting, generator=generator)
    values: dict[int, dict[str, torch.Tensor]] = {}
    feats: dict[int, torch.Tensor] = {}
    pixels: dict[int, torch.Tensor] = {}
    for t in p.needed:
        pixels[t] = pixels_from_logits(model, records[t].logits)  # clamped to [0, 1]
        rec = quantize_uint8(pixels[t]) if quantize else pixels[t].float()
        values[t] = _per_image(p.per_image, gt, rec, p.lpips_net)
        if p.inception is not None:
            feats[t] = p.inception(rec).double()
    if p.gt_feats is not None:
        p.gt_feats.add(p.inception(gt).double())
    _add_fixed(p, values, feats, x.shape[0])
    if p.adaptive:
        _add_adaptive(p, x, gt, records, pixels, values, feats, offset, fallback)


def _add_fixed(p: _Pass, values: dict, feats: dict, b: int) -> None:
    T, device = p.model.config.tokens_per_iter, p.model.latent_tokens.device
    for t in p.fixed_iters:
        p.fixed[t].add(values[t], b, torch.full((b,), (t + 1) * T, device=device))
        if p.use_fid:
            p.fixed_feats[t].add(feats[t])


def _select(criterion: Criterion, fallback: str, views: list[StepView]) -> torch.Tensor:
    """Each image's chosen iteration (0-based, a device tensor), by encode's rule (CountChoice)."""
    last = len(views) - 1
    choice = CountChoice(criterion, fallback, views[0].rows.numel(), views[0].rows.device)
    for t in range(last + 1 if choice.best else last):  # at the last iteration everything stops regardless
        choice.update(views[t], t)
    chosen = choice.chosen(last)
    if bound_decides(criterion, choice.best):
        never = out_of_reach(criterion, views[0].model, views[0].images)
        if never is not None:  # as encode does: out of reach, the last count stands (over a stop by rounding too)
            chosen = torch.where(never.to(chosen.device), last, chosen)
    return chosen


def _add_adaptive(p: _Pass, x, gt, records, pixels, values, feats, offset: int, fallback: str) -> None:
    """Each criterion row picks each image's own iteration from values every iteration already has."""
    model = p.model
    T, iters, b = model.config.tokens_per_iter, model.config.iterations, x.shape[0]
    rows_ids = torch.arange(b, device=x.device) + offset
    views = [
        StepView(model, t, (t + 1) * T, rows_ids, records[t].gt_indices, model.model_images(x), records[t].logits,
                 _pixels=pixels[t])
        for t in range(iters)
    ]
    png = png_bytes_per_pixel(_uint8(gt))
    stacked = {m: torch.stack([values[t][m] for t in range(iters)]) for m in p.per_image}  # [iters, b]
    all_f = torch.stack([feats[t] for t in range(iters)]) if p.use_fid else None  # [iters, b, dim]
    for a in p.adaptive:
        chosen = _select(a.criterion, fallback, views)
        picked = {m: v.gather(0, chosen[None]).squeeze(0) for m, v in stacked.items()}
        a.sums.add(picked, b, (chosen + 1) * T)
        if a.features is not None:
            a.features.add(all_f[chosen, torch.arange(b, device=x.device)])
        a.histogram += torch.bincount(chosen, minlength=iters).double()
        a.counts.append(chosen)
        a.png += png


def _reduce_ranks(p: _Pass, world: int, device: torch.device) -> list:
    """Sum every rank's sums (in place) and gather the adaptive rows' per-image token counts and PNG
    sizes; returns those [counts, png] pairs, one per adaptive row."""
    tensors: list[torch.Tensor] = []
    for t in p.fixed_iters:
        tensors.append(p.fixed[t].sums)
        if p.use_fid:
            tensors += p.fixed_feats[t].tensors()
    if p.gt_feats is not None:
        tensors += p.gt_feats.tensors()
    for a in p.adaptive:
        tensors += [a.sums.sums, a.histogram]
        if a.features is not None:
            tensors += a.features.tensors()
    per_image_counts = [[(torch.cat(a.counts) if a.counts else torch.zeros(0, dtype=torch.int64, device=device)).tolist(), a.png]
                        for a in p.adaptive]
    if world <= 1:
        return per_image_counts
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    for stats in [p.gt_feats, *p.fixed_feats.values(), *(a.features for a in p.adaptive)]:
        if stats is not None:
            stats.drop_rows()  # each rank kept only its own vectors
    gathered: list = [None] * world
    dist.all_gather_object(gathered, per_image_counts)
    return [[sum((g[i][0] for g in gathered), []), sum((g[i][1] for g in gathered), [])] for i in range(len(p.adaptive))]


def _longest(seconds: float, world: int, device: torch.device) -> float:
    """The slowest rank's time: the pass is over when every rank is done."""
    if world <= 1:
        return seconds
    longest = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    return float(longest)


def _rows(p: _Pass, per_image_counts: list, fid_method: str) -> tuple[list[EvalRow], int]:
    """The report's rows (fixed, then adaptive) and the number of images evaluated."""
    T = p.model.config.tokens_per_iter
    rows: list[EvalRow] = []
    total_images = 0
    for t in p.fixed_iters:
        means = p.fixed[t].means()
        total_images = means["images"]
        row_metrics = {m: means[m] for m in p.per_image}
        if p.use_fid:
            row_metrics["fid"] = _fid(p.fixed_feats[t], p.gt_feats, fid_method)
        rows.append(EvalRow(f"tokens:{(t + 1) * T}", "fixed", float((t + 1) * T), row_metrics, means["images"],
                            means.get("psnr_exact_images", 0)))
    for a, (chosen, png) in zip(p.adaptive, per_image_counts):
        means = a.sums.means()
        total_images = means["images"]
        row_metrics = {m: means[m] for m in p.per_image}
        if p.use_fid:
            row_metrics["fid"] = _fid(a.features, p.gt_feats, fid_method)
        hist = {(t + 1) * T: int(v) for t, v in enumerate(a.histogram.tolist())}
        tokens_per_image = [(c + 1) * T for c in chosen]
        rows.append(EvalRow(a.name, "adaptive", means["mean_tokens"], row_metrics, means["images"],
                            means.get("psnr_exact_images", 0), hist, spearman(tokens_per_image, png)))
    return rows, total_images


def _settings(model, metric_names, halting, seed, quantize, crop, fallback, has_criteria: bool, fid_method,
              batch_size, world: int, device) -> dict:
    cfg = model.config
    # "official" halts stochastically with a VQGAN base and never with a VAE (the official code's mask is lost)
    random_halting = halting == "stochastic" or (halting == "official" and not getattr(cfg, "is_vae", False))
    # a VAE base samples its posterior: from the seeded generator under "stochastic"/"official",
    # from torch's global generator (as the official code does) otherwise
    samples = bool(getattr(model.base_tokenizer, "sample_posterior", False))
    deterministic = not random_halting and not samples
    seeded = halting in ("stochastic", "official") and not deterministic
    return {
        "image_size": cfg.image_size,
        "tokens_per_iteration": cfg.tokens_per_iter,
        "max_tokens": cfg.max_tokens,
        "metrics": list(metric_names),
        "halting": halting,
        "seed": seed if seeded else None,
        "deterministic": deterministic,
        "quantize_uint8": quantize,
        "crop": crop,
        "fallback": fallback if has_criteria else None,
        "fid_method": fid_method if "fid" in metric_names else None,
        "batch_size": int(batch_size),
        "world_size": world,
        "device": str(device),
        "dtype": str(model.latent_tokens.dtype).replace("torch.", ""),
    }


def _progress_bar(enabled: bool, total: int | None, world: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=f"evaluate (rank 0 of {world})" if world > 1 else "evaluate",
                dynamic_ncols=True)


@torch.no_grad()
def evaluate(
    model,
    data,
    tokens: "str | int | Sequence[int] | None" = "all",
    criteria: "Sequence[str | Criterion]" = (),
    metrics: "str | Sequence[str]" = ("l1", "l2", "psnr", "ssim"),
    batch_size: int = 16,
    halting: str = "official",
    seed: int = 0,
    quantize: bool = True,
    fallback: str = "max",
    fid_weights: str | None = None,
    lpips_vgg: str | None = None,
    lpips_heads: str | None = None,
    fid_method: str = "eigh",
    crop: str = "center",
    num_workers: int = 0,
    progress: bool = False,
    fid_model=None,
    lpips_model=None,
    progress_file: "str | os.PathLike | None" = None,
    identity: str = "",
    save_every: float = 300.0,
) -> EvalReport:
    """Evaluate ``model`` (an ``alit_fast.ALIT``) on ``data``: images [N, 3, S, S] in [0, 1] (or
    uint8), a folder of image files (read with the official center crop), a Dataset of such
    images, or an iterable of batches.

    ``tokens``: the fixed counts to report ("all" or a list); ``criteria``: adaptive rows (the
    CLI's criterion strings or Criterion objects; ``fallback`` as in ``encode``); ``metrics``: any
    of l1, l2, psnr, ssim, lpips, fid. ``halting``: "official" (default: the official evaluation's,
    stochastic with a VQGAN base, seeded with ``seed``, a no-op with a VAE), "stochastic",
    "threshold" or "off" (deterministic). ``quantize``: the official PNG round
    trip's uint8 truncation of both sets. FID's weights are pytorch-fid's file (``fid_weights``
    or torch hub's cache); LPIPS's torchvision's VGG16 and lpips's v0.1 heads. ``fid_method``:
    "eigh" (the trace of the matrix square root from two symmetric eigendecompositions, on the
    device) or "sqrtm" (pytorch-fid's scipy sqrtm; the same value, far slower at 2048 dims).

    Under an initialised ``torch.distributed`` group each rank evaluates its share of a tensor,
    folder or Dataset, and every rank returns the same report.

    ``progress_file`` (one process, data of known length): the sums so far are saved there every
    ``save_every`` seconds, and a later call with the same ``identity`` (the caller's digest of
    the model's weights, the images and every option) continues from them, to the same report;
    a file of another identity is refused."""
    metric_names, counts, crits, names = check_arguments(model, tokens, criteria, metrics, fallback, halting,
                                                          fid_method, batch_size)
    if progress_file is not None and not identity:
        raise ValueError("evaluate: a progress_file needs an identity (a digest of the weights, images and options) "
                         "so that another evaluation's progress is never continued")
    device, size = model.latent_tokens.device, model.config.image_size
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    p = _new_pass(model, metric_names, counts, crits, names, device)
    _load_networks(p, metric_names, fid_model, lpips_model, fid_weights, lpips_vgg, lpips_heads, device)
    generator = _halting_generator(halting, seed, rank, device)
    keep = progress_file is not None and world == 1 and not _unsized(data)
    done = _restore_progress(progress_file, identity, p, generator, device) if keep else {"offset": 0, "seconds": 0.0}
    batches, shard_len = _batches(data, int(batch_size), rank, world, num_workers, size, crop, start=done["offset"])
    bar = _progress_bar(progress and rank == 0, shard_len, world)
    started, last_save = time.perf_counter() - done["seconds"], time.perf_counter()
    offset = done["offset"]
    for raw in batches:
        x = to_unit(raw, device)
        _check_batch(x, size)
        _add_batch(p, x, offset, quantize, halting, generator, fallback)
        offset += x.shape[0]
        if bar is not None:
            bar.update(x.shape[0])
        if keep and time.perf_counter() - last_save >= save_every:
            _save_progress(progress_file, identity, p, generator, offset, time.perf_counter() - started)
            last_save = time.perf_counter()
    if bar is not None:
        bar.close()
    per_image_counts = _reduce_ranks(p, world, device)
    seconds = _longest(time.perf_counter() - started, world, device)
    rows, total_images = _rows(p, per_image_counts, fid_method)
    settings = _settings(model, metric_names, halting, seed, quantize, crop, fallback, bool(crits), fid_method,
                         batch_size, world, device)
    return EvalReport(rows=rows, settings=settings, seconds=seconds, images=total_images)


def _per_image(names: tuple[str, ...], gt: torch.Tensor, rec: torch.Tensor, lpips_net) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if {"l1", "l2", "psnr"} & set(names):
        l1, l2 = l1_l2(gt, rec)
        out["l1"], out["l2"] = l1, l2
        out["psnr"] = psnr_from_mse(l2)
    if "ssim" in names:
        out["ssim"] = ssim(gt, rec)
    if "lpips" in names:
        out["lpips"] = lpips_net(gt * 2 - 1, rec * 2 - 1).double().reshape(-1)
    return out


def _uint8(images01: torch.Tensor) -> torch.Tensor:
    return (images01 * 255.0).round().to(torch.uint8)


def _fid(a: FeatureStats, b: FeatureStats, method: str) -> float:
    if float(a.count) < 2:
        return math.nan
    return fid_from_stats(a, b, method)


def _load_inception(path, device):
    from .weights import load_fid_inception

    return load_fid_inception(path, device)


def _load_lpips(vgg, heads, device):
    from ..io.lpips_weights import load_lpips

    return load_lpips(vgg, heads, device)
