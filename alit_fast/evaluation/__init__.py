"""Evaluation: reconstruction metrics (L1, L2, PSNR, SSIM, LPIPS, FID) of an ALIT model at every
token count and for adaptive criteria, in one batched, streaming pass (``evaluate``), with the
official evaluation's preprocessing by default. Layer: above io (it loads models, images and
LPIPS weights), below training and the CLI."""
from .data import CROPS, ImageFiles, official_center_crop, read_image
from .metrics import (
    FeatureStats,
    MetricSums,
    fid_from_stats,
    frechet_distance,
    frechet_distance_eigh,
    l1_l2,
    psnr_from_mse,
    quantize_uint8,
    spearman,
    ssim,
)
from .report import write_report
from .run import FID_METHODS, METRICS, EvalReport, EvalRow, evaluate, parse_metrics, parse_tokens
from .weights import FID_WEIGHTS_FILE, FIDWeightsError, default_fid_weights_path, find_fid_weights, load_fid_inception

__all__ = [
    "CROPS",
    "EvalReport",
    "EvalRow",
    "FID_METHODS",
    "FID_WEIGHTS_FILE",
    "FIDWeightsError",
    "FeatureStats",
    "ImageFiles",
    "METRICS",
    "MetricSums",
    "default_fid_weights_path",
    "evaluate",
    "fid_from_stats",
    "find_fid_weights",
    "frechet_distance",
    "frechet_distance_eigh",
    "l1_l2",
    "load_fid_inception",
    "official_center_crop",
    "parse_metrics",
    "parse_tokens",
    "psnr_from_mse",
    "quantize_uint8",
    "read_image",
    "spearman",
    "ssim",
    "write_report",
]
