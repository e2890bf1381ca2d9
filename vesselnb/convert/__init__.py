"""Training checkpoint -> Hugging Face folder. Placeholder: see docs/contracts.md. Being written."""
