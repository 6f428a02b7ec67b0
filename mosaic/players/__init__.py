"""Players shared by synthesis-based methods: generators and discriminators."""
from mosaic.players.generator import Generator
from mosaic.players.patch_discriminator import PatchDiscriminator

__all__ = ["Generator", "PatchDiscriminator"]
