"""Where image bytes come from: one module per kind of reference (worker/intake/fetch.py picks by scheme).

    objects.py   s3:// and oss:// (boto3; presigned URLs for QVQ_IMAGE_DELIVERY=presigned)
    web.py       https:// (and http://): through the SSRF guard, redirects re-checked, size capped while read
    files.py     file:// and local paths (QVQ_ALLOW_LOCAL_FILES), upload:// (images uploaded over HTTP)
    common.py    what every source shares: the size cap

A source is a class with `schemes` and `fetch(ref) -> bytes`, raising ImageError for every failure
(third-party errors are translated in its module, nowhere else).
"""
