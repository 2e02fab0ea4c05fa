#!/bin/bash
# The pollinations upstream stand-in (47320); cycle its modes for model "mirror".
W=http://127.0.0.1:47320
for m in ok html truncated wrongsize notimage e400 e429 e500 e503 huge trickle; do
  curl -s -X POST "$W/mode?m=$m" >/dev/null
  curl -s -o out.json -w "$m -> %{http_code} %{time_total}s %{content_type} " "localhost:47300/prompt/up-$m-$RANDOM?model=mirror"
  python3 -c 'import json;d=json.load(open("out.json"));print(d.get("error"),"|",d.get("message"))' 2>/dev/null || echo "(binary)"
done
