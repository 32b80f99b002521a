"""Bridges to engines that run memdetect past one process (``memdetect.integrations.ray``: Ray Data)."""
