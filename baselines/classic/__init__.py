"""Classic KD baselines: losses on real images, labelled in-domain or the unlabelled OOD pool."""
