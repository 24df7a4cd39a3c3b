from tests.sync.s3 import moto, s3_env

__all__ = ["moto", "s3_env"]
