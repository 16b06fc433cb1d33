"""``ember.models``: built-in model families (one file each), loading, generation, fine-tuning."""
