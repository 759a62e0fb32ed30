"""Model components of llava_ndino."""
