"""WebRTC carrier of the native protocol: signaling checks, the session, its audio tracks."""
