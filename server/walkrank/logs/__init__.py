"""The logs a server writes and training reads: the partitioned Parquet writer
(`partitioned`), its two record kinds (`candidates`, `events`), the server's child-process
writer (`process`) and shipping closed files to object storage (`shipping`)."""
