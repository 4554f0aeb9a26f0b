# The original EMNet release's four command lines: two in its test_script.sh, one in
# train_memory_script.sh, one in train_enhancer_script.sh. Every flag and value is the original's;
# only the authors' interpreter and Windows data folders are replaced by this repository's paths
# (LOL-v1 in ./datasets/LOL-v1, LOL-v2 in ./datasets/LOL-v2, see the README's "Data"). After each
# line: what it needs that this repository cannot bundle, and the nearest line that runs offline.
# The README ("From the original release") shows the same lines; tests/test_original_scripts.py
# runs them against our scripts. A list to copy lines from, not a script:
exit 0

# original: the published LOL-v1 enhancer and memory on eval15
# needs: the authors' model_lolv1.pth and memory_lolv1.pth (their Google Drive or Baidu link), and
# the ImageNet ResNet-18 (resnet18-f37072fd.pth) that their memory's query runs
python test.py --arch emnet_enhancer --arch_memory emnet_memory --pooling_size 1 --mem_size 9000 \
    --embed_dim 32 --V_feat_dim 1 --result_dir ./log_eval/lolv1 --embed_dim 32 \
    --weights ./pre_trained_logs/enhancer/model_lolv1.pth --mem_weights ./pre_trained_logs/memory/memory_lolv1.pth \
    --input_dir ./datasets/LOL-v1/eval15 --testing_top_k 1 --save_images

# offline: the bundled enhancer and memory (1024 slots, queried by the enhancer's own features)
python test.py --arch emnet_enhancer --arch_memory emnet_memory --pooling_size 1 --mem_size 1024 \
    --embed_dim 32 --V_feat_dim 1 --result_dir ./log_eval/lolv1 \
    --weights ./pre_trained_logs/enhancer/emnet_dim32_lolv1_h200_bf16.pth \
    --mem_weights ./pre_trained_logs/memory/emnet_dim32_lolv1_levels_memory.pth \
    --input_dir ./datasets/LOL-v1/eval15 --testing_top_k 1 --save_images

# original: the published LOL-v2 enhancer and memory on LOL-v2's real test pairs
# needs: the authors' model_lolv2.pth and memory_lolv2.pth, and the ImageNet ResNet-18
python test.py --arch emnet_enhancer --arch_memory emnet_memory --pooling_size 1 --mem_size 9000 \
    --embed_dim 32 --V_feat_dim 1 --result_dir ./log_eval/lolv2 --embed_dim 32 \
    --weights ./pre_trained_logs/enhancer/model_lolv2.pth --mem_weights ./pre_trained_logs/memory/memory_lolv2.pth \
    --input_dir ./datasets/LOL-v2/Real_captured/Test --testing_top_k 1 --save_images

# offline: no LOL-v2 weights are bundled; the LOL-v1 pair runs, but LOL-v2's test images overlap
# LOL-v1's training set, so its scores say nothing about unseen images
python test.py --arch emnet_enhancer --arch_memory emnet_memory --pooling_size 1 --mem_size 1024 \
    --embed_dim 32 --V_feat_dim 1 --result_dir ./log_eval/lolv2 \
    --weights ./pre_trained_logs/enhancer/emnet_dim32_lolv1_h200_bf16.pth \
    --mem_weights ./pre_trained_logs/memory/emnet_dim32_lolv1_levels_memory.pth \
    --input_dir ./datasets/LOL-v2/Real_captured/Test --testing_top_k 1 --save_images

# original: the memory (128-px crop entries, ResNet-18 query) on the published LOL-v1 enhancer
# needs: the authors' model_lolv1.pth and the ImageNet ResNet-18
python train_memory.py --env emnet_enhancer_lolv1 --arch emnet_enhancer --arch_memory emnet_memory \
    --pretrain_weights ./pre_trained_logs/enhancer/model_lolv1.pth --embed_dim 32 --nepoch 8000 \
    --train_dir ./datasets/LOL-v1/our485 --val_dir ./datasets/LOL-v1/eval15 --train_workers 4 \
    --datarange 01 --K_feat_dim 512 --V_feat_dim 1 --thres 0.00001 --mem_size 9000 --pooling_size 1 \
    --top_k 32 --testing_top_k 1 --val_time 1 --train_ps 128 --batch_size 128 --cos_thres 0.008

# offline: the bundled enhancer, queried by its own deepest features (16 x 32 = 512 values, the
# width --K_feat_dim asks for) instead of the ResNet-18
python train_memory.py --env emnet_enhancer_lolv1 --arch emnet_enhancer --arch_memory emnet_memory \
    --pretrain_weights ./pre_trained_logs/enhancer/emnet_dim32_lolv1_h200_bf16.pth --embed_dim 32 --nepoch 8000 \
    --train_dir ./datasets/LOL-v1/our485 --val_dir ./datasets/LOL-v1/eval15 --train_workers 4 \
    --datarange 01 --K_feat_dim 512 --V_feat_dim 1 --thres 0.00001 --mem_size 9000 --pooling_size 1 \
    --top_k 32 --testing_top_k 1 --val_time 1 --train_ps 128 --batch_size 128 --cos_thres 0.008 \
    --query_encoder enhancer

# original: the enhancer, loss (1 - SSIM) + LPIPS
# needs: the ImageNet AlexNet (alexnet-owt-7be5be79.pth) that LPIPS runs
python train_enhancer.py --env emnet_enhancer_lolv1 --arch emnet_enhancer --embed_dim 32 --nepoch 800 \
    --lr_initial 2e-4 --batch_size 4 --train_ps 128 \
    --train_dir ./datasets/LOL-v1/our485 --val_dir ./datasets/LOL-v1/eval15 --train_workers 1 --warmup \
    --l2_lambda 0 --l1_lambda 0 --ssim_lambda 1 --lpips_lambda 1 --val_time 2 --datarange 01 \
    --weight_decay 0 --img_vision --torch_vision

# offline: L1 in place of LPIPS, (1 - SSIM) + L1, the loss of the bundled weights
python train_enhancer.py --env emnet_enhancer_lolv1 --arch emnet_enhancer --embed_dim 32 --nepoch 800 \
    --lr_initial 2e-4 --batch_size 4 --train_ps 128 \
    --train_dir ./datasets/LOL-v1/our485 --val_dir ./datasets/LOL-v1/eval15 --train_workers 1 --warmup \
    --l2_lambda 0 --l1_lambda 1 --ssim_lambda 1 --lpips_lambda 0 --val_time 2 --datarange 01 \
    --weight_decay 0 --img_vision --torch_vision
