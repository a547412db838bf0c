"""Policy: model + tokenizer loading, chat formatting, generation backends, the embedded tiny models."""
