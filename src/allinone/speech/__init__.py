"""Speech in: audio decoding, Whisper transcription (faster-whisper) and its serving worker."""
