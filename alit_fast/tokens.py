"""Tokenized datasets: ``open_dataset(INDEX)`` reads what ``alit-fast pretokenize`` wrote, as
(codes, length, path) items with random access; ``TokenBatch`` is one token file."""
from .inference import TokenBatch
from .io.token_dataset import TokenDataset, TokenItem, open_dataset

__all__ = ["TokenBatch", "TokenDataset", "TokenItem", "open_dataset"]
