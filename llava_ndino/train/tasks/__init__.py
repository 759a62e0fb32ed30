"""Tasks: what the one loop trains (the VLM stages and the text objectives), and their registry."""
