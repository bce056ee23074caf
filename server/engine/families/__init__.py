"""One module per served speech family, each implementing `server.engine.family.SpeechModel`."""
