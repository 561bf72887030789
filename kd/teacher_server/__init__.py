"""The teacher on an inference engine (issue 29): vLLM (or any engine speaking its OpenAI-compatible
`/v1/completions` with `prompt_logprobs`) serves the teacher; kdflow asks it for top-k log-probs.

    server = TeacherServerConfig(url="http://pool-gpu-3:8000")                  # config.py (teacher.server)
    with served_teacher(server, model_dir) as url:                               # launch.py: url, or starts vllm serve
        client = TeacherServerClient(url, server)                                # client.py: HTTP, retries, bounded concurrency
        check_served_teacher(client, model_dir, k=64, reference=forward_fn)      # identity.py: exit 2 on a mismatch
        rows = client.prompt_topk([[ids...], ...], k=64)                         # replies.py parses the top-k + tail

This package file imports nothing: kd.config imports kd.teacher_server.config, so the rest loads only
when used. The cache built from a server is kd/teacher_cache/from_server.py.
"""
