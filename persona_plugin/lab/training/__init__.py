"""Training scripts for the bundled assets: LoRA training (:mod:`.lora`), the demo style adapters,
the reflection adapter and its data, the preference heads, the reflection gate."""
