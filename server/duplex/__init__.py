"""Full-duplex speech-to-speech sessions (PersonaPlex) over WebSockets."""
