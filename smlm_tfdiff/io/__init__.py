"""Files and frames: TIFF stacks in, localization tables out, tiling, photometry."""
