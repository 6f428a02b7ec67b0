"""Out-of-domain baselines: methods that distil on an unrelated image pool by synthesising from it (mosaic_ref)."""
