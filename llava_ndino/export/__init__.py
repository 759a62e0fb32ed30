"""Export runs as HF folders that plain transformers (4.x and 5.x) and peft load."""
