"""The YAML profiles (tiny, table, real, sd15), shipped as package data so a regular install finds them from any folder."""
