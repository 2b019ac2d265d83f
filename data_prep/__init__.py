"""fastvit-prep: an ImageNet-style JPEG tree -> FFCV .beton + DALI webdataset shards, several resolutions, one pass.

    manifest = prep_dataset(SRC, OUT, resolutions=[64, 128, 224])   # OUT/manifest.json, ffcv/, dali/
    report = verify_dataset(OUT)                                    # checksums, counts, decode through FFCV + DALI

The console script `fastvit-prep` (data_prep/cli.py) wraps both. Layout of OUT: see DESIGN.md.
Nothing heavy is imported here: FFCV and DALI are imported only by verify_dataset.
"""
from .codec import BadImage, stored_size
from .options import PrepError, PrepOptions, TooManyBadImages
from .prep import prep_dataset
from .verify import verify_dataset

__all__ = ["prep_dataset", "verify_dataset", "PrepError", "TooManyBadImages", "PrepOptions", "BadImage",
           "stored_size"]
