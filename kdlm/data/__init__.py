"""Data: read rows, encode them with their loss masks, split and batch them."""

from kdlm.data.dataset import Collator, DataReport, Example, prepare_data
from kdlm.data.encode import IGNORE, RowError, detect_format, encode_row
from kdlm.data.sources import RawRows, read_rows

__all__ = ["IGNORE", "Collator", "DataReport", "Example", "RawRows", "RowError", "detect_format", "encode_row",
           "prepare_data", "read_rows"]
