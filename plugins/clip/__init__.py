"""The CLIP family: the open_clip backbone, zero-shot and contrastive tasks, and captioned data."""
