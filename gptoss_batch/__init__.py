"""gptoss-batch: run files of prompts through OpenAI-compatible LLM servers, resumably and fast."""

__version__ = "0.1.0"
