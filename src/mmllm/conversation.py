"""The basic types every layer speaks, with nothing beneath them: a chat message, and the label that
marks a token as not trained."""

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}
IGNORE_INDEX = -100  # labels here carry no loss (PyTorch's cross-entropy default)
