#!/usr/bin/env bash
# The design tables of docs/designs.md: the interleaved model reading
# images as codes, Fuyu patches, or resampler queries (16 and 64), or
# writing them as Emu's regressed embeddings (row "embeddings": codes read,
# code vectors regressed by l2, decoded by the diffusion de-tokenizer DETOK;
# "embeddings_gmm": by GIVT's mixture head, sampled; "queries": NExT-GPT /
# SEED-X output queries projected to the code vectors, images read as
# patches, decoded by DETOK; "queries_codi": the same with CoDi-2's
# diffusion loss back-propagated), each
# trained on the same documents (captions both ways, edits, questions),
# for the same steps, batch and width, then evaluated alike; prints the
# table (benchmarks/design_table.py).
#
# Usage: benchmarks/image_input_designs.sh  (env: TOK, DETOK, OUT, STEPS,
#        BATCH, SIZE, DOCS, EVAL, BINS,
#        ROWS="codes patches resampler16 resampler64" (or embeddings,
#        embeddings_gmm, queries, queries_codi),
#        KINDS: the document mix; with refer, grounded_caption or draw_box
#        in it the model gets BINSxBINS location ids, 16 by default, and
#        the eval scores those)
set -euo pipefail
cd "$(dirname "$0")/.."
TOK=${TOK:-workdirs/tok_16k}
DETOK=${DETOK:-workdirs/detok_10k}
OUT=${OUT:-workdirs/designs}
STEPS=${STEPS:-1500}
BATCH=${BATCH:-16}
SIZE=${SIZE:-tiny}
DOCS=${DOCS:-30000}
EVAL=${EVAL:-100}
ROWS=${ROWS:-codes patches resampler16 resampler64}
KINDS=${KINDS:-caption_image,image_caption,edit,question}
LENGTH=320
BINS=${BINS:-16}
# The eval's counts for the kinds in the mix (config args of
# configs/interleaved_shapes.py).
evals=""
bins=0
for pair in question:questions refer:referring grounded_caption:grounded \
            draw_box:drawn; do
  if [[ ",$KINDS," == *",${pair%%:*},"* ]]; then
    evals="$evals,${pair#*:}=$EVAL"
    [[ ${pair%%:*} == question ]] || bins=$BINS
  fi
done

if [[ ! -f "$OUT/text/spiece.model" ]]; then
  python -m unimm.tools.train_text_tokenizer --output "$OUT/text/spiece" \
      --vocab_size 128 --source interleaved --kinds "$KINDS" \
      --num_captions 20000
fi
for row in $ROWS; do
  case "$row" in
    codes) pack=(--image_input codes); arg="image_input=codes" ;;
    embeddings) pack=(--image_input codes)  # the codes row's documents
                arg="output=embeddings,detokenizer_workdir=$DETOK" ;;
    embeddings_gmm) pack=(--image_input codes)
                    arg="output=embeddings,head=gmm,detokenizer_workdir=$DETOK" ;;
    queries*) pack=(--image_input patches --patch_size 4)  # patches' rows
              arg="image_input=patches,patch=4,output=queries,detokenizer_workdir=$DETOK"
              if [[ $row == queries_codi ]]; then arg="$arg,diffusion=1"; fi ;;
    patches) pack=(--image_input patches --patch_size 4)
             arg="image_input=patches,patch=4" ;;
    resampler*) q="${row#resampler}"
                pack=(--image_input resampler --num_queries "$q")
                arg="image_input=resampler,queries=$q" ;;
    *) echo "unknown row $row" >&2; exit 2 ;;
  esac
  data="$OUT/data_${row/embeddings*/codes}"
  data="${data/data_queries*/data_patches}"
  for split in train validation; do
    num=$([[ $split == train ]] && echo "$DOCS" || echo 1000)
    if [[ ! -f "$data/$split.json" ]]; then
      python -m unimm.tools.pack_interleaved --tokenizer_workdir "$TOK" \
          --text_tokenizer "$OUT/text/spiece.model" --out "$data" \
          --split "$split" --num_documents "$num" --length "$LENGTH" \
          --kinds "$KINDS" --location_bins "$BINS" "${pack[@]}"
    fi
  done
  python -m unimm.main --config "configs/interleaved_shapes.py:size=$SIZE,\
steps=$STEPS,batch=$BATCH,length=$LENGTH,packed_dir=$data,\
tokenizer_workdir=$TOK,text_tokenizer=$OUT/text/spiece.model,$arg,\
bins=$bins$evals,beams=1,rerank=0" \
      --config.eval.num_generation="$EVAL" --workdir "$OUT/$row"
done
python benchmarks/design_table.py --workdirs "$(for r in $ROWS; do
  printf '%s,' "$OUT/$r"; done)"
