"""Tests of training/ (tracked runs, searches, their configuration and store): one file per module."""
