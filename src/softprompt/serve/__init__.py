"""The HTTP server: OpenAI-style protocol, the batching scheduler, streams, metrics, the app's
routes and its Ray Serve deployment."""
