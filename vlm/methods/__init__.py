"""The VLM erasers, one file each; vlm.registry finds every module here."""
