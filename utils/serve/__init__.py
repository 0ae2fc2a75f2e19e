"""What answers prompts: Generator, prompt in and response out (generation.py; used by generate.py and
evaluate.py), the OpenAI-compatible routes generate.py serves beside the page (openai_api.py), and
what the page shows for an answer, its code as code (display.py)."""
